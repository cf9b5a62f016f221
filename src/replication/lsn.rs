//! WAL positions.

use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, PgLsn, ToSql, Type};

use super::ReplicationError;

/// A WAL position (`pg_lsn`): a byte offset into the WAL stream, written
/// `X/Y` (high and low 32 bits in hex). Ordered, and subtracting two gives
/// the number of WAL bytes between them, which is how lag is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, PostgreSQL's invalid LSN.
    pub const INVALID: Lsn = Lsn(0);

    /// WAL bytes from `earlier` to `self`, 0 when `earlier` is not earlier
    /// (lag can't be negative; a position read later may already be past).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Parses `X/Y` as PostgreSQL prints it.
    pub fn parse(s: &str) -> Result<Lsn, ReplicationError> {
        s.parse()
    }
}

impl FromStr for Lsn {
    type Err = ReplicationError;

    fn from_str(s: &str) -> Result<Lsn, ReplicationError> {
        let bad = || ReplicationError::InvalidLsn(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl std::ops::Sub for Lsn {
    type Output = u64;
    /// Saturating distance in bytes (see [`Lsn::bytes_since`]).
    fn sub(self, rhs: Lsn) -> u64 {
        self.bytes_since(rhs)
    }
}

impl std::ops::Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, rhs: u64) -> Lsn {
        Lsn(self.0.saturating_add(rhs))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Read `pg_lsn` columns directly (binary format), no text round trip.
impl<'a> FromSql<'a> for Lsn {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        PgLsn::from_sql(ty, raw).map(|l| Lsn(u64::from(l)))
    }

    fn accepts(ty: &Type) -> bool {
        <PgLsn as FromSql>::accepts(ty)
    }
}

/// Pass LSNs as `pg_lsn` parameters.
impl ToSql for Lsn {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        PgLsn::from(self.0).to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <PgLsn as ToSql>::accepts(ty)
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        PgLsn::from(self.0).to_sql_checked(ty, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_order_arithmetic() {
        let a: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(a, Lsn(0x16B3748));
        assert_eq!(a.to_string(), "0/16B3748");
        let b = Lsn::parse("1/0").unwrap();
        assert_eq!(b.0, 1 << 32);
        assert_eq!(b.to_string(), "1/0");
        assert_eq!(Lsn::parse("FFFFFFFF/FFFFFFFF").unwrap(), Lsn(u64::MAX));
        assert_eq!(Lsn::parse("a/b").unwrap(), Lsn((0xA << 32) | 0xB));
        assert!(a < b);
        assert_eq!(b - a, (1 << 32) - 0x16B3748);
        assert_eq!(a - b, 0, "lag saturates at zero");
        assert_eq!(a + 8, Lsn(0x16B3750));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "12",
            "x/1",
            "1/2/3",
            "123456789/0",
            "-1/0",
        ] {
            assert!(Lsn::parse(bad).is_err(), "{bad:?} accepted");
        }
        let json = serde_json_like(&b);
        assert_eq!(json, "1/0");
    }

    fn serde_json_like(l: &Lsn) -> String {
        // toml is a dependency already; a one-field table shows the string form.
        #[derive(serde::Serialize, serde::Deserialize)]
        struct W {
            lsn: Lsn,
        }
        let s = toml::to_string(&W { lsn: *l }).unwrap();
        let back: W = toml::from_str(&s).unwrap();
        assert_eq!(back.lsn, *l);
        back.lsn.to_string()
    }
}
