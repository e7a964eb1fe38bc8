//! Packet accounting: counts two sides of a run must agree on.
//!
//! A benchmark or test that moves frames between a frontend and a backend
//! states what must be equal (frames the frontend sent and frames the
//! backend counted, frames the backend returned and frames the frontend
//! received back, ...) as [`CountCheck`]s; [`verify`] fails with the
//! number of frames lost (or counted twice) in each that does not hold.

use std::fmt;

use crate::error::{Error, Result};

/// Two counts of the same frames that must be equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountCheck {
    /// What is compared ("frames the frontend sent / counted by the sink").
    pub what: String,
    /// The count of the side that sent the frames.
    pub sent: u64,
    /// The count of the side that received or accounted for them.
    pub counted: u64,
    /// Frames that may be missing from `counted` because they were still
    /// in flight when the run stopped and could not be drained (0: none).
    pub in_flight: u64,
}

impl CountCheck {
    /// A check that `counted` equals `sent`.
    pub fn new(what: impl Into<String>, sent: u64, counted: u64) -> CountCheck {
        CountCheck {
            what: what.into(),
            sent,
            counted,
            in_flight: 0,
        }
    }

    /// Allows up to `n` frames sent but not counted, still in flight at the
    /// stop (e.g. written into receive buffers the frontend had posted
    /// before the sender stopped, when the frontend cannot drain them).
    pub fn in_flight(mut self, n: u64) -> CountCheck {
        self.in_flight = n;
        self
    }

    /// Frames sent but not counted (negative: counted more than sent).
    pub fn lost(&self) -> i128 {
        i128::from(self.sent) - i128::from(self.counted)
    }

    /// Whether the two counts agree (up to the frames allowed in flight).
    pub fn holds(&self) -> bool {
        self.counted <= self.sent && self.sent - self.counted <= self.in_flight
    }
}

impl fmt::Display for CountCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} / {}", self.what, self.sent, self.counted)?;
        match self.lost() {
            0 => write!(f, " ok"),
            n if self.holds() => write!(
                f,
                " ok ({n} in flight at the stop, at most {} allowed)",
                self.in_flight
            ),
            n if n > 0 => write!(f, " ({n} lost)"),
            n => write!(f, " ({} more counted than sent)", -n),
        }
    }
}

/// Fails if any check does not hold, naming each with its loss.
pub fn verify(checks: &[CountCheck]) -> Result<()> {
    let bad: Vec<String> = checks
        .iter()
        .filter(|c| !c.holds())
        .map(|c| c.to_string())
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Lost(bad.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_verify_names_every_loss() {
        let ok = CountCheck::new("a", 10, 10);
        assert!(ok.holds());
        assert!(verify(std::slice::from_ref(&ok)).is_ok());
        let lost = CountCheck::new("sent / counted by the sink", 10, 9);
        let extra = CountCheck::new("b", 3, 5);
        assert_eq!(lost.lost(), 1);
        assert_eq!(extra.lost(), -2);
        let e = match verify(&[ok, lost, extra]) {
            Ok(()) => panic!("losses not reported"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("sent / counted by the sink: 10 / 9 (1 lost)"),
            "{e}"
        );
        assert!(e.contains("b: 3 / 5 (2 more counted than sent)"), "{e}");
        assert!(!e.contains("a: "), "{e}");
        let flight = CountCheck::new("c", 300, 44).in_flight(256);
        assert!(flight.holds());
        assert!(flight.to_string().contains("256 in flight"), "{flight}");
        assert!(!CountCheck::new("c", 300, 43).in_flight(256).holds());
        assert!(!CountCheck::new("c", 300, 301).in_flight(256).holds());
    }
}
