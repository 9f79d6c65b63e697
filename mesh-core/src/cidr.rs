//! CIDR parsing and overlap checks.

use ipnet::IpNet;

use crate::Error;

/// Parses a CIDR such as `10.1.0.0/16`; host bits must be zero.
pub fn parse_cidr(value: &str) -> crate::Result<IpNet> {
    let net: IpNet = value
        .parse()
        .map_err(|e: ipnet::AddrParseError| Error::InvalidCidr {
            value: value.into(),
            reason: e.to_string(),
        })?;
    if net.trunc() != net {
        return Err(Error::InvalidCidr {
            value: value.into(),
            reason: format!("host bits are set (did you mean {}?)", net.trunc()),
        });
    }
    Ok(net)
}

/// Whether two networks share at least one address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first pair `(a, b)` with `a` from `left` and `b` from `right` that overlap.
pub fn first_overlap<'a>(left: &'a [IpNet], right: &'a [IpNet]) -> Option<(&'a IpNet, &'a IpNet)> {
    left.iter()
        .flat_map(|a| right.iter().map(move |b| (a, b)))
        .find(|(a, b)| overlaps(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        parse_cidr(s).unwrap()
    }

    #[test]
    fn parse() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        let err = parse_cidr("10.0.0.1/8").unwrap_err();
        assert!(err.to_string().contains("10.0.0.1/8"), "{err}");
        assert!(parse_cidr("nonsense").is_err());
    }

    #[test]
    fn overlap() {
        assert!(overlaps(&n("10.0.0.0/8"), &n("10.1.0.0/16")));
        assert!(overlaps(&n("10.1.0.0/16"), &n("10.0.0.0/8")));
        assert!(!overlaps(&n("10.1.0.0/16"), &n("10.2.0.0/16")));
        assert!(!overlaps(&n("10.1.0.0/16"), &n("fd00::/8")));
        let l = [n("10.1.0.0/16"), n("10.2.0.0/16")];
        let r = [n("10.3.0.0/16"), n("10.2.128.0/17")];
        assert_eq!(first_overlap(&l, &r), Some((&l[1], &r[1])));
    }
}
