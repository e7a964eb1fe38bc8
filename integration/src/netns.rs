//! Network namespaces and taps for tests.
//!
//! Each [`Netns`] has a unique name (`ioasis-<pid>-<n>`) and is deleted on
//! drop. Traffic of a test stays inside it.
//!
//! Taps: a backend attaches to (or creates) a tap by name with `TUNSETIFF`,
//! which looks the name up in the network namespace of the calling process.
//! So a backend that must use a tap inside the namespace runs inside it:
//! start it through [`Netns::command`] (`ip netns exec`, which changes only
//! the network namespace and /sys, so unix socket paths under /tmp stay
//! shared with the frontend). The backend then creates the tap itself, with
//! the flags it wants (multiqueue, vnet header); [`Netns::wait_link`] waits
//! for it to appear and [`Netns::addr_up`] addresses it. [`Netns::add_tap`]
//! creates a persistent tap instead, for tools that expect one.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::env::{require_root, require_tool};
use crate::error::{Error, Result};
use crate::process::{poll_until, run};

const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// Counters of one interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets the interface received (for a tap: frames the backend wrote).
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets the interface sent (for a tap: frames the backend read).
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Received frames dropped.
    pub rx_dropped: u64,
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name and brings its loopback up.
    pub fn new() -> Result<Netns> {
        require_root()?;
        require_tool("ip", "iproute2")?;
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ioasis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // A stale namespace of a killed earlier run with this pid: remove it.
        let _ = run(Command::new("ip").args(["netns", "del", &name]), IP_TIMEOUT);
        run(Command::new("ip").args(["netns", "add", &name]), IP_TIMEOUT)?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            IP_TIMEOUT,
        )
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs a shell command inside the namespace to completion, returning stdout.
    pub fn sh(&self, script: &str, timeout: Duration) -> Result<String> {
        run(self.command("sh").arg("-c").arg(script), timeout)
    }

    /// Creates a persistent tap `ifname` in the namespace.
    pub fn add_tap(&self, ifname: &str, multi_queue: bool) -> Result<()> {
        let mut args = vec!["tuntap", "add", "dev", ifname, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.ip(&args).map(|_| ())
    }

    /// Whether interface `ifname` exists in the namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        self.ip(&["link", "show", "dev", ifname]).is_ok()
    }

    /// Waits (bounded) for interface `ifname` to appear, e.g. a tap a backend creates.
    pub fn wait_link(&self, ifname: &str, timeout: Duration) -> Result<()> {
        poll_until(
            &format!("interface {ifname} in netns {}", self.name),
            timeout,
            Duration::from_millis(50),
            || Ok(self.has_link(ifname).then_some(())),
            || self.ip(&["link"]).unwrap_or_default(),
        )
    }

    /// Adds `cidr` (e.g. `10.0.0.2/24`) to `ifname` and sets it up.
    pub fn addr_up(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", ifname])?;
        self.ip(&["link", "set", ifname, "up"]).map(|_| ())
    }

    /// Reads the counters of `ifname`.
    pub fn link_stats(&self, ifname: &str) -> Result<LinkStats> {
        let out = self.ip(&["-s", "-j", "link", "show", "dev", ifname])?;
        parse_link_stats(&out).ok_or_else(|| Error::Parse {
            what: format!("`ip -s -j link show dev {ifname}`"),
            path: Path::new("-").to_path_buf(),
            detail: out,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(
            Command::new("ip").args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        ) {
            eprintln!("deleting netns {} failed: {e}", self.name);
        }
    }
}

fn parse_link_stats(json: &str) -> Option<LinkStats> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = v.get(0)?.get("stats64")?;
    let get = |dir: &str, k: &str| s.get(dir)?.get(k)?.as_u64();
    Some(LinkStats {
        rx_packets: get("rx", "packets")?,
        rx_bytes: get("rx", "bytes")?,
        tx_packets: get("tx", "packets")?,
        tx_bytes: get("tx", "bytes")?,
        rx_dropped: get("rx", "dropped").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_link_stats() {
        let j = r#"[{"ifname":"t0","stats64":{"rx":{"bytes":640,"packets":10,"errors":0,"dropped":2},"tx":{"bytes":64,"packets":1}}}]"#;
        assert_eq!(
            parse_link_stats(j),
            Some(LinkStats {
                rx_packets: 10,
                rx_bytes: 640,
                tx_packets: 1,
                tx_bytes: 64,
                rx_dropped: 2
            })
        );
        assert_eq!(parse_link_stats("[]"), None);
    }
}
