//! Covering a set of prefixes with a few wider ones, for the kernel's prefilters
//! (`nat_common::prefilter`): a filter holds [`FILTER_PREFIXES`] prefixes, and a table with
//! more gets the fewest-widened cover that fits instead of "always look up". A cover may only
//! say "maybe" too often (an address in a wider prefix is looked up and found absent), never
//! "no" for an address some prefix contains.

use ipnet::Ipv4Net;
use nat_common::prefilter::{PrefixFilter, FILTER_PREFIXES};

/// The prefilter of a table holding `prefixes`.
pub fn filter_of<'a>(prefixes: impl IntoIterator<Item = &'a Ipv4Net>) -> PrefixFilter {
    let prefixes: Vec<Ipv4Net> = prefixes.into_iter().copied().collect();
    PrefixFilter::of(
        cover(&prefixes, FILTER_PREFIXES)
            .iter()
            .map(|p| (p.network().octets(), p.prefix_len())),
    )
}

/// At most `max` (at least 1) prefixes that together contain every address of `prefixes`:
/// the prefixes themselves (without those inside another) when they are few enough, else
/// every prefix cut to the longest length at which the cut ones are few enough.
pub fn cover(prefixes: &[Ipv4Net], max: usize) -> Vec<Ipv4Net> {
    let max = max.max(1);
    for len in (0..=32u8).rev() {
        let cut = outermost(prefixes.iter().map(|p| {
            if p.prefix_len() > len {
                Ipv4Net::new(p.network(), len)
                    .expect("a length below 32 is valid")
                    .trunc()
            } else {
                p.trunc()
            }
        }));
        if cut.len() <= max {
            return cut;
        }
    }
    unreachable!("cut to length 0, any set of prefixes is at most one prefix")
}

/// `prefixes` without duplicates and without those contained in another.
fn outermost(prefixes: impl Iterator<Item = Ipv4Net>) -> Vec<Ipv4Net> {
    let mut sorted: Vec<Ipv4Net> = prefixes.collect();
    // Shorter prefixes first within the same network address: an outer prefix precedes every
    // prefix it contains, which then follow it contiguously in address order.
    sorted.sort_by_key(|p| (u32::from(p.network()), p.prefix_len()));
    let mut out: Vec<Ipv4Net> = Vec::with_capacity(sorted.len());
    for p in sorted {
        match out.last() {
            Some(last) if last.contains(&p) => {}
            _ => out.push(p),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn few_prefixes_are_kept_as_they_are() {
        let p = nets(&["198.18.1.0/24", "203.0.113.7/32", "198.18.0.0/16"]);
        assert_eq!(cover(&p, 8), nets(&["198.18.0.0/16", "203.0.113.7/32"]));
    }

    #[test]
    fn many_hosts_are_covered_by_their_common_networks() {
        let mut p = Vec::new();
        for net in 1..=3u8 {
            for host in 1..=20u8 {
                p.push(format!("198.18.{net}.{host}/32").parse().unwrap());
            }
        }
        // Hosts .1-.20 of three /24s: at /28 they are six prefixes, the longest cut that fits.
        assert_eq!(
            cover(&p, 8),
            nets(&[
                "198.18.1.0/28",
                "198.18.1.16/28",
                "198.18.2.0/28",
                "198.18.2.16/28",
                "198.18.3.0/28",
                "198.18.3.16/28"
            ])
        );
        assert_eq!(
            cover(&p, 3),
            nets(&["198.18.1.0/27", "198.18.2.0/27", "198.18.3.0/27"])
        );
    }

    #[test]
    fn nothing_is_covered_by_nothing() {
        assert!(cover(&[], 8).is_empty());
        let f = filter_of(&[]);
        assert!(!f.may_match([198, 51, 100, 1]));
    }

    proptest! {
        /// Never more than `max`, every input inside some output, and the filter built from the
        /// cover says "maybe" for every address of every input prefix.
        #[test]
        fn a_cover_contains_everything_and_fits(
            raw in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..64),
            max in 1usize..=8,
            probes in proptest::collection::vec(any::<u32>(), 0..16),
        ) {
            let prefixes: Vec<Ipv4Net> = raw
                .iter()
                .map(|&(a, l)| Ipv4Net::new(a.into(), l).unwrap().trunc())
                .collect();
            let c = cover(&prefixes, max);
            prop_assert!(c.len() <= max);
            for p in &prefixes {
                prop_assert!(c.iter().any(|o| o.contains(p)), "{p} not covered by {c:?}");
            }
            if max == FILTER_PREFIXES {
                let f = filter_of(&prefixes);
                for p in &prefixes {
                    for probe in &probes {
                        // An address inside p: p's network bits, the probe's host bits.
                        let host_mask = !u32::from(p.netmask());
                        let addr = u32::from(p.network()) | (probe & host_mask);
                        prop_assert!(f.may_match(addr.to_be_bytes()));
                    }
                    prop_assert!(f.may_match(p.network().octets()));
                }
            }
        }
    }
}
