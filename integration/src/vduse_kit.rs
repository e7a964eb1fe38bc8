//! The guest kit of the VDUSE tests: a kernel with VDUSE, its vDPA
//! modules, the `vdpa` tool, and a way to put a workspace daemon with its
//! shared libraries into a guest.
//!
//! The host's kernel and Debian's 6.1 lack VDUSE; Debian's 6.12 (bookworm
//! security suite) has `vduse.ko`, `vdpa.ko` and `virtio_vdpa.ko`.
//! `scripts/setup.sh` unpacks that kernel package (without installing it)
//! into [`kernel_dir`]: `vmlinuz-<version>` and `lib/modules/<version>/`.
//! The package has no `modules.dep`: the load order comes from each
//! module's own `depends=` (what `modinfo -F depends` prints).
//!
//! The base initramfs (cached under `target/ioasis-guest/`) has the same
//! `/init` and `/lib/ioasis.sh` as every guest ([`crate::guest`]), loads
//! [`VDUSE_MODULES`] with their dependencies at boot, and carries
//! `/sbin/vdpa` and `/usr/bin/ip.iproute2` (iproute2's `ip`, for network
//! namespaces), with their libraries. A test
//! adds the daemon it runs in the guest with [`binary_files`].

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::cpio::CpioWriter;
use crate::env::{target_dir, which};
use crate::error::{io, Error, Result};
use crate::guest::{module_name, read_module, GuestKit, INIT, LIB};
use crate::process::run;

/// Where `scripts/setup.sh` unpacks the kernel (`IOASIS_VDUSE_KERNEL_DIR`
/// overrides it).
pub const DEFAULT_KERNEL_DIR: &str = "/var/cache/ioasis/vduse-kernel";

/// The modules the guests load at boot (with their dependencies, first):
/// `virtio_pci` too, for QEMU's vhost-user devices beside the VDUSE ones.
pub const VDUSE_MODULES: &[&str] = &[
    "virtio_pci",
    "vduse",
    "virtio_vdpa",
    "virtio_blk",
    "virtio_net",
    "tun",
];

/// Modules the initramfs carries with their dependencies but does not
/// load at boot: a script loads them with `load_module NAME` (order in
/// `/etc/ioasis-load-NAME`). `vhost_vdpa` stays out of the boot list so
/// that `virtio_vdpa`, which the other tests check, binds new devices;
/// `null_blk` (a memory-backed disk whose requests complete after a set
/// delay) takes module parameters.
pub const VDUSE_ON_DEMAND_MODULES: &[&str] = &["vhost_vdpa", "null_blk"];

/// The DPDK poll-mode drivers a guest's `dpdk-testpmd` loads with `-d`
/// (from [`TESTPMD_PMD_DIR`]): virtio_user and the ring mempool.
pub const TESTPMD_PMDS: &[&str] = &["librte_net_virtio.so.23", "librte_mempool_ring.so.23"];

/// Where Debian's DPDK 22.11 keeps its poll-mode drivers (the host path,
/// which the guest gets too).
pub const TESTPMD_PMD_DIR: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

/// The host tools the guests carry, where each goes and the Debian package
/// that has it. iproute2's `ip` (network namespaces) goes beside busybox's
/// applet, which `/init` installs as `ip`.
const TOOLS: &[(&str, &str, &str)] = &[
    ("vdpa", "sbin/vdpa", "iproute2"),
    ("ip", "usr/bin/ip.iproute2", "iproute2"),
];

/// The directory the VDUSE kernel is read from.
pub fn kernel_dir() -> PathBuf {
    std::env::var_os("IOASIS_VDUSE_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KERNEL_DIR))
}

static KIT: OnceLock<std::result::Result<GuestKit, String>> = OnceLock::new();

/// The VDUSE guests' kit, built on first use (cached on disk across runs).
/// [`Error::Unavailable`] when the kernel was not unpacked (run
/// `scripts/setup.sh`) or a tool is missing.
pub fn kit() -> Result<&'static GuestKit> {
    KIT.get_or_init(|| build().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Unavailable(format!("VDUSE guest kit: {e}")))
}

fn find_kernel(dir: &Path) -> Result<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, String)> = fs::read_dir(dir)
        .map_err(|e| {
            Error::Unavailable(format!(
                "no VDUSE guest kernel in {} ({e}); scripts/setup.sh unpacks Debian's linux-image-6.12 there",
                dir.display()
            ))
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let v = p.file_name()?.to_str()?.strip_prefix("vmlinuz-")?.to_string();
            Some((p, v))
        })
        .filter(|(_, v)| dir.join("lib/modules").join(v).is_dir())
        .collect();
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found.pop().ok_or_else(|| {
        Error::Unavailable(format!(
            "no vmlinuz-<version> with lib/modules/<version> in {}; run scripts/setup.sh",
            dir.display()
        ))
    })
}

/// Every module file under `root`, by module name.
fn module_files(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    // Bounded: a kernel's module tree has a few thousand directories.
    let mut seen = 0usize;
    while let Some(d) = dirs.pop() {
        seen += 1;
        if seen > 100_000 {
            break;
        }
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.to_string_lossy().contains(".ko") {
                out.push((module_name(&p.to_string_lossy()), p));
            }
        }
    }
    out
}

/// The `depends=` of a module's `.modinfo` (names; empty for none).
pub fn module_depends(data: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let mut i = 0;
    while let Some(pos) = data[i..].windows(key.len()).position(|w| w == key) {
        let at = i + pos;
        // A .modinfo entry starts after a NUL.
        if at == 0 || data[at - 1] == 0 {
            let rest = &data[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            return String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect();
        }
        i = at + 1;
    }
    Vec::new()
}

/// `(name, contents)` of `wanted` and their dependencies, dependencies
/// first; built-in modules (in `builtin`) are left out.
fn resolve(
    files: &[(String, PathBuf)],
    builtin: &[String],
    wanted: &[&str],
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    // Depth-first, dependencies before dependents; bounded by the tree.
    fn visit(
        name: &str,
        files: &[(String, PathBuf)],
        builtin: &[String],
        out: &mut Vec<(String, Vec<u8>)>,
        stack: &mut Vec<String>,
    ) -> Result<()> {
        if out.iter().any(|(n, _)| n == name) || builtin.iter().any(|b| b == name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) || stack.len() > 64 {
            return Err(Error::Unavailable(format!(
                "module dependency loop at {name}"
            )));
        }
        let path = files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| Error::Unavailable(format!("the VDUSE kernel has no module {name}")))?;
        let data = read_module(&path)?;
        stack.push(name.to_string());
        for d in module_depends(&data) {
            visit(&d, files, builtin, out, stack)?;
        }
        stack.pop();
        out.push((name.to_string(), data));
        Ok(())
    }
    let mut stack = Vec::new();
    for w in wanted {
        visit(w, files, builtin, &mut out, &mut stack)?;
    }
    Ok(out)
}

/// The shared libraries `binary` loads (`ldd`), as absolute paths.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let text = run(Command::new("ldd").arg(binary), Duration::from_secs(30))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Files that put `binary` at `/bin/<name>` of a guest with its shared
/// libraries at their host paths, for
/// [`QemuConfig::file`](crate::qemu::QemuConfig::file) (files under
/// `bin/` and `lib64/` are executable in the guest).
pub fn binary_files(binary: &Path, name: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = vec![(
        format!("bin/{name}"),
        fs::read(binary).map_err(io(format!("read {}", binary.display())))?,
    )];
    for lib in shared_libraries(binary)? {
        let data = fs::read(&lib).map_err(io(format!("read {}", lib.display())))?;
        out.push((
            lib.to_string_lossy().trim_start_matches('/').to_string(),
            data,
        ));
    }
    Ok(out)
}

/// Files that put Debian's `dpdk-testpmd` at `/bin/dpdk-testpmd` of a
/// guest with its shared libraries, and the poll-mode drivers of
/// [`TESTPMD_PMDS`] (with theirs) at their host paths under
/// [`TESTPMD_PMD_DIR`]; a script loads those with `-d`. Only these
/// drivers go in: EAL would `dlopen` every driver of a complete driver
/// directory, and many need libraries of hardware the guest lacks.
/// [`Error::Unavailable`] without `dpdk-testpmd` (package dpdk).
pub fn testpmd_files() -> Result<Vec<(String, Vec<u8>)>> {
    let testpmd = which("dpdk-testpmd")
        .ok_or_else(|| Error::Unavailable("`dpdk-testpmd` (package dpdk) is missing".into()))?;
    let mut out = binary_files(&testpmd, "dpdk-testpmd")?;
    for pmd in TESTPMD_PMDS {
        let path = Path::new(TESTPMD_PMD_DIR).join(pmd);
        if !path.is_file() {
            return Err(Error::Unavailable(format!(
                "DPDK driver {} is missing (package dpdk 22.11)",
                path.display()
            )));
        }
        for (at, data) in binary_files(&path, "unused")?.into_iter().skip(1) {
            if !out.iter().any(|(p, _)| *p == at) {
                out.push((at, data));
            }
        }
        out.push((
            path.to_string_lossy().trim_start_matches('/').to_string(),
            fs::read(&path).map_err(io(format!("read {}", path.display())))?,
        ));
    }
    Ok(out)
}

fn build() -> Result<GuestKit> {
    let dir = kernel_dir();
    let (kernel, version) = find_kernel(&dir)?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Unavailable("no static busybox (Debian package busybox-static)".into())
        })?;
    let mut tools = Vec::new();
    for (tool, at, pkg) in TOOLS {
        let p = which(tool)
            .ok_or_else(|| Error::Unavailable(format!("`{tool}` (package {pkg}) is missing")))?;
        tools.push((*at, p));
    }
    let mut h = DefaultHasher::new();
    INIT.hash(&mut h);
    LIB.hash(&mut h);
    version.hash(&mut h);
    VDUSE_MODULES.hash(&mut h);
    VDUSE_ON_DEMAND_MODULES.hash(&mut h);
    TOOLS.hash(&mut h);
    for p in std::iter::once(&busybox).chain(tools.iter().map(|(_, p)| p)) {
        p.hash(&mut h);
        fs::metadata(p)
            .map_err(io(format!("stat {}", p.display())))?
            .len()
            .hash(&mut h);
    }
    let cache = target_dir().join("ioasis-guest");
    fs::create_dir_all(&cache).map_err(io(format!("create {}", cache.display())))?;
    let base = cache.join(format!("vduse-{version}-{:016x}.cpio", h.finish()));
    if base.is_file() {
        return Ok(GuestKit::from_parts(kernel, version, base));
    }
    eprintln!(
        "[ioasis-integration] building the VDUSE guest initramfs {}",
        base.display()
    );
    let root = dir.join("lib/modules").join(&version);
    let builtin: Vec<String> = fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let modules = resolve(&module_files(&root.join("kernel")), &builtin, VDUSE_MODULES)?;

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
        "lib64",
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
    for (name, data) in &modules {
        w.file(&format!("lib/modules/{name}.ko"), 0o644, data);
        order.push_str(name);
        order.push('\n');
    }
    w.file("etc/ioasis-modules", 0o644, order.as_bytes());
    for wanted in VDUSE_ON_DEMAND_MODULES {
        let chain = resolve(&module_files(&root.join("kernel")), &builtin, &[wanted])?;
        let mut order = String::new();
        for (name, data) in &chain {
            if !modules.iter().any(|(n, _)| n == name) {
                w.file(&format!("lib/modules/{name}.ko"), 0o644, data);
            }
            order.push_str(name);
            order.push('\n');
        }
        w.file(
            &format!("etc/ioasis-load-{wanted}"),
            0o644,
            order.as_bytes(),
        );
    }
    let mut dirs: Vec<String> = Vec::new();
    for (at, path) in &tools {
        let data = fs::read(path).map_err(io(format!("read {}", path.display())))?;
        w.file(at, 0o755, &data);
        for lib in shared_libraries(path)? {
            let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
            if dirs.contains(&rel) {
                continue;
            }
            if let Some((parent, _)) = rel.rsplit_once('/') {
                let mut acc = String::new();
                for part in parent.split('/') {
                    if !acc.is_empty() {
                        acc.push('/');
                    }
                    acc.push_str(part);
                    if !dirs.contains(&acc) {
                        w.dir(&acc);
                        dirs.push(acc.clone());
                    }
                }
            }
            let data = fs::read(&lib).map_err(io(format!("read {}", lib.display())))?;
            w.file(&rel, 0o755, &data);
            dirs.push(rel);
        }
    }
    w.file("lib/ioasis.sh", 0o644, LIB.as_bytes());
    w.file("init", 0o755, INIT.as_bytes());
    let tmp = cache.join(format!("tmp-vduse-{}.cpio", std::process::id()));
    fs::write(&tmp, w.finish()).map_err(io(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, &base).map_err(io(format!("rename to {}", base.display())))?;
    Ok(GuestKit::from_parts(kernel, version, base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_module_depends_parses_modinfo() {
        let data = b"\x7fELF...\0license=GPL\0depends=vdpa,vhost_iotlb\0name=vduse\0";
        assert_eq!(module_depends(data), ["vdpa", "vhost_iotlb"]);
        assert!(module_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(module_depends(b"nothing here").is_empty());
    }
}
