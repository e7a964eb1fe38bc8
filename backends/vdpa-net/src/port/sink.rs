//! `sink`: counts and drops every frame; never receives.

use std::os::fd::BorrowedFd;

use super::{PacketBuf, Port, Result, SendOutcome};

/// A port that takes every frame and discards it.
#[derive(Debug, Default)]
pub struct SinkPort {
    frames: u64,
}

impl SinkPort {
    /// Frames taken so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

impl Port for SinkPort {
    fn describe(&self) -> String {
        "sink".to_string()
    }

    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        self.frames += pkts.len() as u64;
        SendOutcome {
            sent: pkts.len(),
            ..Default::default()
        }
    }

    fn recv(&mut self, _max: usize, _deliver: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<usize> {
        Ok(0)
    }

    fn rx_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn produces_frames(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sink_counts_and_never_receives() {
        let mut s = SinkPort::default();
        let mut b: Vec<PacketBuf> = (0..3).map(|_| PacketBuf::new()).collect();
        assert_eq!(s.send(&mut b).sent, 3);
        assert_eq!(s.frames(), 3);
        assert_eq!(s.recv(10, &mut |_| true).unwrap(), 0);
        assert!(s.rx_fd().is_none());
    }
}
