//! Where worker threads run: CPU lists as operators write them (`1`,
//! `0,2-3`, as `taskset -c` and DPDK's `-l` take them), the CPUs this
//! process may run on, and pinning the calling thread.
//!
//! A device that pins its data-plane workers ([`Device::worker_cpus`])
//! leaves every other thread of the process (the connection thread that
//! answers IOTLB updates and sets rings up, the server, statistics) free
//! to run where the scheduler puts it, as a DPDK application keeps its
//! control threads off its polling lcores. Pinning the whole process
//! instead (`taskset` around it) puts the connection thread on the
//! polling worker's CPU, where every IOTLB update waits for the worker
//! to be preempted.
//!
//! [`Device::worker_cpus`]: crate::device::Device::worker_cpus

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Parses a CPU list: comma-separated CPU numbers and inclusive ranges
/// (`1`, `0,2-3`), in the order given, without repeats.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus: Vec<usize> = Vec::new();
    let num = |t: &str| -> Result<usize, String> {
        let t = t.trim();
        match t.parse::<usize>() {
            Ok(n) if n < CpuSet::count() => Ok(n),
            Ok(n) => Err(format!(
                "CPU {n} is beyond the {} CPUs a set holds",
                CpuSet::count()
            )),
            Err(_) => Err(format!("{t:?} is not a CPU number")),
        }
    };
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("range {part:?} runs backwards"));
        }
        for c in lo..=hi {
            if cpus.contains(&c) {
                return Err(format!("CPU {c} is listed twice"));
            }
            cpus.push(c);
        }
    }
    Ok(cpus)
}

/// The CPUs the calling thread may run on (its affinity), in order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).map_err(std::io::Error::from)?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Checks that this process may run on every CPU of `cpus`; the error
/// says which one it may not, and which it may.
pub fn check_allowed(cpus: &[usize]) -> Result<(), String> {
    let allowed = allowed_cpus().map_err(|e| format!("reading this process's CPUs: {e}"))?;
    match cpus.iter().find(|c| !allowed.contains(c)) {
        None => Ok(()),
        Some(c) => Err(format!(
            "CPU {c} is not one this process may run on ({allowed:?})"
        )),
    }
}

/// Restricts the calling thread to `cpus` (not empty).
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(std::io::Error::from)?;
    }
    if cpus.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an empty CPU list",
        ));
    }
    sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_cpu_list() {
        assert_eq!(parse_cpu_list("1"), Ok(vec![1]));
        assert_eq!(parse_cpu_list("0,2-3"), Ok(vec![0, 2, 3]));
        assert_eq!(parse_cpu_list("3, 1"), Ok(vec![3, 1]));
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("1,1").is_err());
        assert!(parse_cpu_list("0-2,2").is_err());
        assert!(parse_cpu_list("99999").is_err());
    }

    #[test]
    fn test_pin_to_an_allowed_cpu_and_back() {
        let all = allowed_cpus().expect("sched_getaffinity");
        let first = *all.first().expect("some CPU");
        // On a thread of its own, so the test harness's threads keep theirs.
        let seen = std::thread::spawn(move || {
            pin_current_thread(&[first]).expect("pin");
            allowed_cpus().expect("sched_getaffinity")
        })
        .join()
        .expect("thread");
        assert_eq!(seen, vec![first]);
        assert!(pin_current_thread(&[]).is_err());
        assert_eq!(check_allowed(&all), Ok(()));
        let beyond = all.iter().max().expect("some CPU") + 1;
        assert!(check_allowed(&[beyond]).is_err());
    }
}
