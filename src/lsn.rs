//! Log sequence numbers.
//!
//! An LSN is a byte position in the write-ahead log. Postgres prints it as two
//! hexadecimal halves, `XXXXXXXX/XXXXXXXX` (the high and low 32 bits), and that
//! is the only text form this crate accepts or produces. The `message_id` of an
//! event uses a different, fixed-width form ([`Lsn::to_fixed_hex`]) so ids sort
//! lexically in WAL order.

use std::fmt;
use std::str::FromStr;

/// A WAL position. `Lsn(0)` is Postgres' `InvalidXLogRecPtr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// 16 upper-case hex digits, zero padded: the form used inside `message_id`.
    pub fn to_fixed_hex(self) -> String {
        format!("{:016X}", self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal halves like 0/16B3748")]
pub struct ParseLsnError {
    pub input: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            input: s.to_string(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_postgres_text_form() {
        let lsn: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16B3748));
        assert_eq!(lsn.to_string(), "0/16B3748");
        let big: Lsn = "1A/FF".parse().unwrap();
        assert_eq!(big, Lsn((0x1A << 32) | 0xFF));
        assert_eq!(big.to_string(), "1A/FF");
    }

    #[test]
    fn fixed_hex_is_sortable() {
        assert_eq!(Lsn(0x16B37A0).to_fixed_hex(), "00000000016B37A0");
        assert!(Lsn(9).to_fixed_hex() < Lsn(10).to_fixed_hex());
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in ["", "0", "/1", "1/", "x/1", "123456789/0", "0/-1"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be rejected");
        }
    }
}
