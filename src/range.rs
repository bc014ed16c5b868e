//! Port ranges: validation, the default range, and the kernel's ephemeral range.

use std::fmt;
use std::ops::RangeInclusive;

use crate::error::{Error, Result};

/// An inclusive, non-empty range of ports, such as `15000-32767`.
///
/// ```
/// let range = portdaddy::PortRange::new(20000, 20009)?;
/// assert_eq!(range.len(), 10);
/// assert!(range.contains(20005));
/// assert_eq!(range.to_string(), "20000-20009");
/// # Ok::<(), portdaddy::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "RawRange"))]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// A range from `start` to `end`, both included.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] when `start` is 0 (not a port one can lease) or `start > end`.
    pub fn new(start: u16, end: u16) -> Result<Self> {
        if start == 0 {
            return Err(Error::InvalidRange {
                start,
                end,
                reason:
                    "port 0 is not a port (it asks the kernel for any port); start at 1 or above",
            });
        }
        if start > end {
            return Err(Error::InvalidRange {
                start,
                end,
                reason: "the range is reversed or empty; give the lower port first",
            });
        }
        Ok(Self { start, end })
    }

    /// First port of the range.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// Last port of the range (included).
    pub fn end(&self) -> u16 {
        self.end
    }

    /// How many ports the range holds (at least 1).
    #[allow(clippy::len_without_is_empty)] // a PortRange is never empty
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    /// Whether the two ranges share at least one port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// The default range for automatic choices.
    ///
    /// The largest block of ports between 15000 and 65535 that lies outside the kernel's
    /// ephemeral range (see [`PortRange::ephemeral`]); on a stock Linux that is
    /// `15000-32767`. If that block is shorter than 1024 ports (an unusual ephemeral
    /// setting), the largest block between 1024 and 65535 outside it. Ports below 1024 are
    /// never in the default range.
    pub fn default_for_host() -> PortRange {
        let eph = Self::ephemeral();
        Self::largest_outside(15000, eph)
            .filter(|r| r.len() >= 1024)
            .or_else(|| Self::largest_outside(1024, eph))
            // The ephemeral range covers every unprivileged port: overlap cannot be avoided.
            .unwrap_or(PortRange {
                start: 15000,
                end: 65535,
            })
    }

    /// The range from which the kernel picks ports for `bind(0)` and outgoing connections.
    ///
    /// On Linux it is read from `/proc/sys/net/ipv4/ip_local_port_range`; elsewhere, or when
    /// that file cannot be read, it is the IANA range `49152-65535` that macOS, the BSDs and
    /// Windows use by default.
    pub fn ephemeral() -> PortRange {
        const IANA: PortRange = PortRange {
            start: 49152,
            end: 65535,
        };
        crate::sys::ephemeral_port_range()
            .and_then(|text| Self::parse_pair(&text))
            .unwrap_or(IANA)
    }

    fn parse_pair(text: &str) -> Option<PortRange> {
        let mut it = text.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(a)), Some(Ok(b))) = (it.next(), it.next()) else {
            return None;
        };
        PortRange::new(a, b).ok()
    }

    /// The largest run of `floor..=65535` that does not overlap `avoid`.
    fn largest_outside(floor: u16, avoid: PortRange) -> Option<PortRange> {
        let below = (avoid.start > floor).then(|| PortRange {
            start: floor,
            end: avoid.start - 1,
        });
        let above_start = avoid.end.checked_add(1).map(|s| s.max(floor));
        let above = above_start.map(|start| PortRange {
            start,
            end: u16::MAX,
        });
        [below, above]
            .into_iter()
            .flatten()
            .max_by_key(PortRange::len)
    }
}

/// The serialized form, validated through [`PortRange::new`] on the way in.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
struct RawRange {
    start: u16,
    end: u16,
}

#[cfg(feature = "serde")]
impl TryFrom<RawRange> for PortRange {
    type Error = Error;

    fn try_from(raw: RawRange) -> Result<Self> {
        PortRange::new(raw.start, raw.end)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl TryFrom<RangeInclusive<u16>> for PortRange {
    type Error = Error;

    fn try_from(r: RangeInclusive<u16>) -> Result<Self> {
        PortRange::new(*r.start(), *r.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_reversed_and_zero() {
        assert!(matches!(
            PortRange::new(10, 9),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            PortRange::new(0, 9),
            Err(Error::InvalidRange { .. })
        ));
        assert_eq!(PortRange::new(9, 9).unwrap().len(), 1);
    }

    #[test]
    fn default_avoids_stock_linux_ephemeral_range() {
        let eph = PortRange::new(32768, 60999).unwrap();
        let r = PortRange::largest_outside(15000, eph).unwrap();
        assert_eq!(r, PortRange::new(15000, 32767).unwrap());
        assert!(!r.overlaps(&eph));
    }

    #[test]
    fn default_moves_below_when_ephemeral_range_starts_low() {
        let eph = PortRange::new(16000, 65535).unwrap();
        assert_eq!(PortRange::largest_outside(15000, eph).unwrap().len(), 1000);
        let r = PortRange::largest_outside(1024, eph).unwrap();
        assert_eq!(r, PortRange::new(1024, 15999).unwrap());
    }

    #[test]
    fn host_default_never_below_1024() {
        let r = PortRange::default_for_host();
        assert!(r.start() >= 1024);
        assert!(!r.overlaps(&PortRange::ephemeral()) || PortRange::ephemeral().start() <= 1025);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn deserializing_validates_like_new() {
        let ok: PortRange = serde_json::from_str(r#"{"start":3,"end":9}"#).unwrap();
        assert_eq!(ok.len(), 7);
        assert!(serde_json::from_str::<PortRange>(r#"{"start":9,"end":3}"#).is_err());
        assert!(serde_json::from_str::<PortRange>(r#"{"start":0,"end":3}"#).is_err());
    }

    #[test]
    fn parses_proc_format() {
        assert_eq!(
            PortRange::parse_pair("32768\t60999\n"),
            PortRange::new(32768, 60999).ok()
        );
        assert_eq!(PortRange::parse_pair("garbage"), None);
    }
}
