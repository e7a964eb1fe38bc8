//! The guest kit: a Debian kernel plus a busybox initramfs built by the harness.
//!
//! The base initramfs holds a static busybox, the virtio-net and virtio-blk
//! module chain taken from `/lib/modules/<version>` of the installed kernel (compressed
//! modules are decompressed while building), a `/init` and a small shell
//! library. It is built once and cached under `target/ioasis-guest/`. Each
//! guest gets its own initramfs: the cached base with a second archive
//! appended (the kernel unpacks concatenated archives) that holds the test's
//! script as `/test.sh`.
//!
//! `/init` mounts the usual file systems, loads the modules, sources
//! `/lib/ioasis.sh`, prints the `BOOTED` marker, runs `/test.sh`, prints
//! `END:<status>` and powers off. Markers look like `@@IOASIS:NAME@@` on the
//! serial console; a script prints its own with `mark NAME`. Helpers for
//! scripts (all in `/lib/ioasis.sh`):
//!
//! - `mark WORDS...`: print a marker;
//! - `virtio_if [N]`: the name of the N-th (default first) virtio-net interface;
//! - `net_up IFACE ADDR/PREFIX`: bring an interface up with an address and
//!   wait (up to 10 s) for its carrier;
//! - `try_ping COUNT DEADLINE_SECS ADDR`: ping, print the output and a
//!   `PING_OK ADDR` or `PING_FAIL ADDR` marker;
//! - `load_module NAME [PARAM=VALUE...]`: load one of [`ON_DEMAND_MODULES`]
//!   with its dependencies, the parameters given to NAME itself (fails if
//!   the kernel has no such module).
//!
//! Modules in [`ON_DEMAND_MODULES`] (the packet generator, `pktgen`) are in
//! the initramfs with their dependencies (from the kernel's `modules.dep`,
//! the list `modinfo -F depends` prints) but only loaded by scripts that
//! ask for them: `/etc/ioasis-load-<name>` holds the load order.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::cpio::CpioWriter;
use crate::env::{target_dir, which};
use crate::error::{io, Error, Result};
use crate::process::run;

/// The modules /init loads, in dependency order (virtio-net and virtio-blk).
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

/// Modules the initramfs carries, with their dependencies, for scripts to
/// load with `load_module NAME` (not loaded at boot).
pub const ON_DEMAND_MODULES: &[&str] = &["pktgen"];

/// The prefix of every marker the guest prints.
pub const MARKER_PREFIX: &str = "@@IOASIS:";

/// Formats a marker as it appears on the console.
pub fn marker(name: &str) -> String {
    format!("{MARKER_PREFIX}{name}@@")
}

/// The `/init` of every guest initramfs.
pub(crate) const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
dmesg -n 1
for m in $(cat /etc/ioasis-modules); do
    insmod /lib/modules/$m.ko || echo "@@IOASIS:INSMOD_FAILED $m@@"
done
ip link set lo up
. /lib/ioasis.sh
echo "@@IOASIS:BOOTED@@"
rc=0
if [ -f /test.sh ]; then
    ( . /test.sh )
    rc=$?
fi
if [ "$rc" != 0 ]; then
    echo "--- guest dmesg tail"
    dmesg | tail -n 40
fi
echo "@@IOASIS:END:$rc@@"
sync
poweroff -f
"#;

/// `/lib/ioasis.sh`, the helpers of guest scripts.
pub(crate) const LIB: &str = r#"# Helpers for guest test scripts.
mark() { echo "@@IOASIS:$*@@"; }
virtio_if() {
    n=${1:-0}
    for d in /sys/class/net/*; do
        drv=$(readlink "$d/device/driver" 2>/dev/null)
        case "$drv" in
        */virtio_net)
            if [ "$n" = 0 ]; then basename "$d"; return 0; fi
            n=$((n - 1));;
        esac
    done
    return 1
}
net_up() {
    ip addr add "$2" dev "$1" && ip link set "$1" up || return 1
    i=0
    while [ $i -lt 100 ]; do
        [ "$(cat /sys/class/net/$1/carrier 2>/dev/null)" = 1 ] && return 0
        sleep 0.1
        i=$((i + 1))
    done
    echo "carrier of $1 stayed down"
    return 1
}
load_module() {
    [ -f "/etc/ioasis-load-$1" ] || { echo "no module $1 in the initramfs"; return 1; }
    _lm=$1; shift
    for m in $(cat "/etc/ioasis-load-$_lm"); do
        grep -q "^$m " /proc/modules && continue
        if [ "$m" = "$_lm" ]; then
            insmod "/lib/modules/$m.ko" "$@" || return 1
        else
            insmod "/lib/modules/$m.ko" || return 1
        fi
    done
}
try_ping() {
    if ping -c "$1" -w "$2" "$3"; then mark PING_OK "$3"; return 0; fi
    mark PING_FAIL "$3"
    cat /proc/net/dev
    return 1
}
"#;

/// A script that addresses the first virtio-net interface with `cidr` and
/// pings `peer` `count` times within 30 s (markers `PING_OK <peer>` /
/// `PING_FAIL <peer>`).
pub fn ping_script(cidr: &str, peer: &str, count: u32) -> String {
    ping_script_within(cidr, peer, count, 30)
}

/// [`ping_script`] with a deadline of `secs` seconds: for a peer that is
/// itself a guest booting on its own schedule (two TCG guests on a loaded
/// machine can come up tens of seconds apart).
pub fn ping_script_within(cidr: &str, peer: &str, count: u32, secs: u32) -> String {
    format!(
        "IF=$(virtio_if) || {{ mark NO_VIRTIO_IF; exit 1; }}\n\
         net_up \"$IF\" {cidr} || {{ mark LINK_DOWN; exit 1; }}\n\
         try_ping {count} {secs} {peer}\n"
    )
}

/// A guest kernel and the cached base initramfs.
#[derive(Debug)]
pub struct GuestKit {
    kernel: PathBuf,
    version: String,
    base: PathBuf,
}

static KIT: OnceLock<std::result::Result<GuestKit, String>> = OnceLock::new();

impl GuestKit {
    /// The kit, built on first use (once per process; cached on disk across runs).
    ///
    /// `IOASIS_GUEST_KERNEL` may name a `vmlinuz-<version>` to use; otherwise
    /// the newest `/boot/vmlinuz-*` whose modules include virtio_net is taken.
    pub fn get() -> Result<&'static GuestKit> {
        KIT.get_or_init(|| GuestKit::build().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Unavailable(format!("guest kit: {e}")))
    }

    /// A kit of `kernel` (version `version`) and an initramfs built
    /// elsewhere (the VDUSE guests' kit, [`crate::vduse_kit`]).
    pub(crate) fn from_parts(kernel: PathBuf, version: String, base: PathBuf) -> GuestKit {
        GuestKit {
            kernel,
            version,
            base,
        }
    }

    /// The kernel image.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The kernel version (the `/lib/modules` directory name).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The cached base initramfs.
    pub fn base_initrd(&self) -> &Path {
        &self.base
    }

    /// Writes `dir/<name>.cpio`: the base initramfs plus `/test.sh` = `script`.
    pub fn initrd_with_script(&self, dir: &Path, name: &str, script: &str) -> Result<PathBuf> {
        self.initrd_with_files(dir, name, script, &[])
    }

    /// Like [`initrd_with_script`](Self::initrd_with_script), with extra
    /// files for the script (`(path in the guest, contents)`, e.g. a data
    /// pattern the guest writes to a disk).
    pub fn initrd_with_files(
        &self,
        dir: &Path,
        name: &str,
        script: &str,
        files: &[(String, Vec<u8>)],
    ) -> Result<PathBuf> {
        let mut bytes =
            fs::read(&self.base).map_err(io(format!("read {}", self.base.display())))?;
        let mut w = CpioWriter::new(1_000_000);
        w.file("test.sh", 0o755, script.as_bytes());
        let mut dirs: Vec<&str> = Vec::new();
        for (path, data) in files {
            // Parent directories first: the kernel does not create them.
            let mut end = 0;
            while let Some(i) = path[end..].find('/') {
                end += i;
                let d = &path[..end];
                if !dirs.contains(&d) {
                    w.dir(d);
                    dirs.push(d);
                }
                end += 1;
            }
            // Programs (and the dynamic loader) are executable.
            let exec = ["bin/", "sbin/", "lib64/"]
                .iter()
                .any(|d| path.starts_with(d));
            w.file(path, if exec { 0o755 } else { 0o644 }, data);
        }
        bytes.extend_from_slice(&w.finish());
        let path = dir.join(format!("{name}.cpio"));
        fs::write(&path, bytes).map_err(io(format!("write {}", path.display())))?;
        Ok(path)
    }

    fn build() -> Result<GuestKit> {
        let (kernel, version) = find_kernel()?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Unavailable("no static busybox (Debian package busybox-static)".into())
            })?;
        let modules = find_modules(&version)?;
        let on_demand = find_on_demand_modules(&version)?;

        let mut h = DefaultHasher::new();
        INIT.hash(&mut h);
        LIB.hash(&mut h);
        version.hash(&mut h);
        for (name, order) in &on_demand {
            name.hash(&mut h);
            order.hash(&mut h);
        }
        let on_demand_files = on_demand
            .iter()
            .flat_map(|(_, order)| order.iter().map(|(_, p)| p));
        for p in std::iter::once(&busybox)
            .chain(modules.iter().map(|(_, p)| p))
            .chain(on_demand_files)
        {
            p.hash(&mut h);
            let m = fs::metadata(p).map_err(io(format!("stat {}", p.display())))?;
            m.len().hash(&mut h);
            m.modified()
                .unwrap_or(SystemTime::UNIX_EPOCH)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                .hash(&mut h);
        }
        let dir = target_dir().join("ioasis-guest");
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let base = dir.join(format!("base-{version}-{:016x}.cpio", h.finish()));
        if base.is_file() {
            return Ok(GuestKit {
                kernel,
                version,
                base,
            });
        }
        eprintln!(
            "[ioasis-integration] building guest initramfs {}",
            base.display()
        );
        let mut w = CpioWriter::new(0);
        for d in [
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "root",
            "etc",
            "lib",
            "lib/modules",
            "var",
        ] {
            w.dir(d);
        }
        w.char_dev("dev/console", 5, 1);
        w.char_dev("dev/null", 1, 3);
        let bb = fs::read(&busybox).map_err(io(format!("read {}", busybox.display())))?;
        w.file("bin/busybox", 0o755, &bb);
        w.symlink("bin/sh", "busybox");
        let mut order = String::new();
        for (name, path) in &modules {
            let data = read_module(path)?;
            w.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
            order.push_str(name);
            order.push('\n');
        }
        w.file("etc/ioasis-modules", 0o644, order.as_bytes());
        let mut written: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
        for (name, load) in &on_demand {
            let mut order = String::new();
            for (dep, path) in load {
                if !written.contains(&dep.as_str()) {
                    let data = read_module(path)?;
                    w.file(&format!("lib/modules/{dep}.ko"), 0o644, &data);
                    written.push(dep);
                }
                order.push_str(dep);
                order.push('\n');
            }
            w.file(&format!("etc/ioasis-load-{name}"), 0o644, order.as_bytes());
        }
        w.file("lib/ioasis.sh", 0o644, LIB.as_bytes());
        w.file("init", 0o755, INIT.as_bytes());
        let tmp = dir.join(format!("tmp-{}.cpio", std::process::id()));
        fs::write(&tmp, w.finish()).map_err(io(format!("write {}", tmp.display())))?;
        fs::rename(&tmp, &base).map_err(io(format!("rename to {}", base.display())))?;
        Ok(GuestKit {
            kernel,
            version,
            base,
        })
    }
}

fn find_kernel() -> Result<(PathBuf, String)> {
    let version_of = |p: &Path| -> Option<String> {
        p.file_name()?
            .to_str()?
            .strip_prefix("vmlinuz-")
            .map(str::to_string)
    };
    if let Some(k) = std::env::var_os("IOASIS_GUEST_KERNEL") {
        let k = PathBuf::from(k);
        let v = version_of(&k).ok_or_else(|| {
            Error::Unavailable(format!(
                "IOASIS_GUEST_KERNEL={} is not named vmlinuz-<version>",
                k.display()
            ))
        })?;
        return Ok((k, v));
    }
    let mut found: Vec<(PathBuf, String)> = fs::read_dir("/boot")
        .map_err(|e| Error::Unavailable(format!("cannot list /boot: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| version_of(&p).map(|v| (p, v)))
        .filter(|(_, v)| {
            Path::new("/lib/modules")
                .join(v)
                .join("modules.dep")
                .is_file()
        })
        .collect();
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found.pop().ok_or_else(|| {
        Error::Unavailable(
            "no /boot/vmlinuz-<version> with /lib/modules/<version> (Debian package linux-image-amd64)"
                .into(),
        )
    })
}

/// Canonical module name: file stem without `.ko*`, `-` as `_`.
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolves [`VIRTIO_MODULES`] to files; built-in modules are left out.
fn find_modules(version: &str) -> Result<Vec<(String, PathBuf)>> {
    let root = Path::new("/lib/modules").join(version);
    let dep = fs::read_to_string(root.join("modules.dep"))
        .map_err(|e| Error::Unavailable(format!("cannot read modules.dep of {version}: {e}")))?;
    let files: HashMap<String, String> = dep
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(|p| (module_name(p), p.to_string()))
        .collect();
    let builtin: Vec<String> = fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut out = Vec::new();
    for m in VIRTIO_MODULES {
        if let Some(rel) = files.get(*m) {
            out.push((m.to_string(), root.join(rel)));
        } else if builtin.iter().any(|b| b == m) {
            continue;
        } else if *m == "virtio_net" || *m == "virtio_pci" || *m == "virtio_blk" {
            return Err(Error::Unavailable(format!(
                "kernel {version} has no module {m}"
            )));
        } else {
            log::warn!("kernel {version} has no module {m}; continuing without it");
        }
    }
    Ok(out)
}

/// Resolves [`ON_DEMAND_MODULES`]: for each module the kernel has, its
/// load order (dependencies first, from `modules.dep`; built-in ones left
/// out, so a built-in module has an empty order). A module the kernel lacks
/// is left out with a warning; a script that loads it fails.
#[allow(clippy::type_complexity)]
fn find_on_demand_modules(version: &str) -> Result<Vec<(String, Vec<(String, PathBuf)>)>> {
    let root = Path::new("/lib/modules").join(version);
    let dep = fs::read_to_string(root.join("modules.dep"))
        .map_err(|e| Error::Unavailable(format!("cannot read modules.dep of {version}: {e}")))?;
    let builtin: Vec<String> = fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut out = Vec::new();
    for m in ON_DEMAND_MODULES {
        if builtin.iter().any(|b| b == m) {
            out.push((m.to_string(), Vec::new()));
            continue;
        }
        match load_order(&dep, m) {
            Some(order) => out.push((
                m.to_string(),
                order
                    .into_iter()
                    .map(|(n, rel)| (n, root.join(rel)))
                    .collect(),
            )),
            None => log::warn!("kernel {version} has no module {m}; scripts cannot load it"),
        }
    }
    Ok(out)
}

/// The load order of module `name` from the text of a `modules.dep`:
/// `(name, relative path)` pairs, dependencies first, `name` last. `None`
/// if `modules.dep` does not list it.
fn load_order(modules_dep: &str, name: &str) -> Option<Vec<(String, String)>> {
    // Each line is `path: dep1 dep2 ...`, every dependency of the module
    // (transitively), in an order where a module comes before the ones it
    // depends on; loading goes in reverse.
    let line = modules_dep
        .lines()
        .find(|l| l.split(':').next().map(module_name).as_deref() == Some(name))?;
    let (path, deps) = line.split_once(':')?;
    let mut order: Vec<(String, String)> = deps
        .split_whitespace()
        .rev()
        .map(|d| (module_name(d), d.to_string()))
        .collect();
    order.push((name.to_string(), path.trim().to_string()));
    Some(order)
}

/// Reads a module, decompressing `.xz`, `.zst` and `.gz` with the system tools.
pub(crate) fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    match tool {
        None => fs::read(path).map_err(io(format!("read {}", path.display()))),
        Some((tool, pkg)) => {
            let exe = which(tool).ok_or_else(|| {
                Error::Unavailable(format!(
                    "{} is compressed and `{tool}` (package {pkg}) is missing",
                    path.display()
                ))
            })?;
            // Decompress through a file: `run` collects text, modules are binary.
            let out = std::env::temp_dir().join(format!(
                "ioasis-mod-{}-{}.ko",
                std::process::id(),
                module_name(&name)
            ));
            run(
                Command::new("sh")
                    .arg("-c")
                    .arg("\"$0\" -dc \"$1\" > \"$2\"")
                    .arg(&exe)
                    .arg(path)
                    .arg(&out),
                Duration::from_secs(60),
            )?;
            let data = fs::read(&out).map_err(io(format!("read {}", out.display())));
            let _ = fs::remove_file(&out);
            data
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_module_name_normalizes() {
        assert_eq!(
            module_name("kernel/drivers/net/virtio_net.ko"),
            "virtio_net"
        );
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio-ring.ko.xz"),
            "virtio_ring"
        );
        assert_eq!(module_name("virtio_pci.ko.zst"), "virtio_pci");
    }

    #[test]
    fn test_load_order_puts_dependencies_first() {
        let dep = "kernel/net/core/pktgen.ko:\n\
                   kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n";
        assert_eq!(
            load_order(dep, "pktgen"),
            Some(vec![("pktgen".into(), "kernel/net/core/pktgen.ko".into())])
        );
        let order: Vec<String> = load_order(dep, "virtio_net")
            .unwrap_or_default()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(order, ["failover", "net_failover", "virtio_net"]);
        assert_eq!(load_order(dep, "nope"), None);
    }

    #[test]
    fn test_marker_format() {
        assert_eq!(marker("PING_OK 10.0.0.2"), "@@IOASIS:PING_OK 10.0.0.2@@");
    }
}
