//! Rule changes through the rule banks, run through the real XDP object with
//! BPF_PROG_TEST_RUN: each change is written into the bank the program does not use and then
//! switched to, so every packet sees either the old or the new rule set, never a mix; stale
//! entries of a bank are gone when it is used again; counters of unchanged rules carry on;
//! established sessions keep their translation.
//!
//! Needs root (loads BPF). Never skips.

mod common;

use common::{
    packet::Packet,
    xdp::{Dir, Expect, Fixture},
};
use nat_common::stats::Reason;

const CLIENT: &str = "198.51.100.7";

/// `web` points at `backend`; `dns` never changes.
fn dnat_config(web_backend: Option<&str>) -> String {
    let web = match web_backend {
        Some(backend) => format!(
            r#"
[[dnat]]
id = 10
name = "web"
destination = "198.18.100.10"
protocol = "tcp"
port = 80
to_address = "{backend}"
to_port = 8080
"#
        ),
        None => String::new(),
    };
    format!(
        r#"
[[interfaces]]
name = "nat0"
{web}
[[dnat]]
id = 11
name = "dns"
destination = "198.18.100.11"
protocol = "udp"
port = 53
to_address = "198.18.1.11"
to_port = 5353
"#
    )
}

#[test]
fn dnat_changes_switch_banks_and_leave_no_stale_entries() {
    let mut fx = Fixture::load(&dnat_config(Some("198.18.1.10")));
    assert_eq!(fx.dataplane().active_bank(), 0);
    let web = Packet::tcp(CLIENT, 40000, "198.18.100.10", 80);
    let dns = Packet::udp(CLIENT, 33333, "198.18.100.11", 53);
    let dns_at_backend = Packet::udp(CLIENT, 33333, "198.18.1.11", 5353);
    let dns_slot = fx.slot("dns");

    fx.check(
        "web, first rule set",
        &web.build(),
        &Expect::forward(
            "web",
            Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080).build(),
        ),
    );
    fx.check(
        "dns, first rule set",
        &dns.build(),
        &Expect::forward("dns", dns_at_backend.build()),
    );

    // web moves to another backend: bank 1 now, and dns keeps its counter slot.
    fx.reload(&dnat_config(Some("198.18.1.99")));
    assert_eq!(fx.dataplane().active_bank(), 1);
    assert_eq!(
        fx.slot("dns"),
        dns_slot,
        "an unchanged rule keeps its counters"
    );
    fx.check(
        "web, moved",
        &web.build(),
        &Expect::forward(
            "web",
            Packet::tcp(CLIENT, 40000, "198.18.1.99", 8080).build(),
        ),
    );
    fx.check(
        "dns, unchanged",
        &dns.build(),
        &Expect::forward("dns", dns_at_backend.build()),
    );

    // web deleted: bank 0 again, which still held the first web rule; it must be gone.
    fx.reload(&dnat_config(None));
    assert_eq!(fx.dataplane().active_bank(), 0);
    fx.check(
        "web, deleted",
        &web.build(),
        &Expect::pass_unchanged(Reason::NoMatch, &web.build()),
    );
    fx.check(
        "dns, still unchanged",
        &dns.build(),
        &Expect::forward("dns", dns_at_backend.build()),
    );
    let dns_counters = fx.counters().rules[&dns_slot];
    assert_eq!(
        dns_counters.orig_packets, 3,
        "dns counted every packet across the changes"
    );

    // And back: bank 1, which held the moved rule; the first backend is what counts now.
    fx.reload(&dnat_config(Some("198.18.1.10")));
    assert_eq!(fx.dataplane().active_bank(), 1);
    fx.check(
        "web, restored",
        &web.build(),
        &Expect::forward(
            "web",
            Packet::tcp(CLIENT, 40000, "198.18.1.10", 8080).build(),
        ),
    );
}

fn snat_config(external: &str) -> String {
    format!(
        r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "out"
source = "198.18.0.0/24"
to_address = "{external}"
"#
    )
}

#[test]
fn snat_pool_change_applies_to_new_flows_and_sessions_keep_theirs() {
    let mut fx = Fixture::load(&snat_config("203.0.113.1"));
    let out = [("out", Dir::Original)];
    let first = Packet::udp("198.18.0.2", 5000, "198.51.100.53", 53);
    fx.check(
        "first flow, first pool",
        &first.build(),
        &Expect::session(
            Reason::SessionNew,
            Packet::udp("203.0.113.1", 5000, "198.51.100.53", 53).build(),
            &out,
        ),
    );

    fx.reload(&snat_config("203.0.113.2"));
    assert_eq!(fx.dataplane().active_bank(), 1);
    fx.check(
        "first flow after the change: its session's translation",
        &first.build(),
        &Expect::session(
            Reason::SessionOrig,
            Packet::udp("203.0.113.1", 5000, "198.51.100.53", 53).build(),
            &out,
        ),
    );
    let second = Packet::udp("198.18.0.3", 5000, "198.51.100.53", 53);
    fx.check(
        "new flow after the change: the new pool (bank 1's pool id)",
        &second.build(),
        &Expect::session(
            Reason::SessionNew,
            Packet::udp("203.0.113.2", 5000, "198.51.100.53", 53).build(),
            &out,
        ),
    );

    // Back to bank 0, whose pool entry is rewritten in place.
    fx.reload(&snat_config("203.0.113.3"));
    assert_eq!(fx.dataplane().active_bank(), 0);
    let third = Packet::udp("198.18.0.4", 5000, "198.51.100.53", 53);
    fx.check(
        "new flow after the second change",
        &third.build(),
        &Expect::session(
            Reason::SessionNew,
            Packet::udp("203.0.113.3", 5000, "198.51.100.53", 53).build(),
            &out,
        ),
    );
}

/// SNAT from `sources` (each a /24 of 198.18.x.0) and one DNAT VIP per entry of `vips`.
fn many_prefixes_config(sources: &[u8], vips: &[u8]) -> String {
    let mut config = String::from(
        r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024
"#,
    );
    for (i, x) in sources.iter().enumerate() {
        config.push_str(&format!(
            r#"
[[snat]]
id = {id}
name = "out{x}"
source = "198.18.{x}.0/24"
to_address = "203.0.113.{x}"
"#,
            id = 100 + i,
        ));
    }
    for (i, x) in vips.iter().enumerate() {
        config.push_str(&format!(
            r#"
[[dnat]]
id = {id}
name = "vip{x}"
destination = "198.18.200.{x}"
to_address = "198.18.201.{x}"
"#,
            id = 200 + i,
        ));
    }
    config
}

/// The trie prefilters (`nat_common::prefilter`) only skip lookups that find nothing: with a
/// few prefixes (listed as they are) and with more than a filter holds (covered by wider
/// prefixes, so some addresses outside are looked up and not found), every prefix still
/// matches after each bank flip, and addresses outside them match nothing.
#[test]
fn prefilters_follow_the_prefixes_of_each_bank() {
    let few: Vec<u8> = vec![1, 2];
    let many: Vec<u8> = (1..=12).collect();
    let mut fx = Fixture::load(&many_prefixes_config(&few, &few));
    for (round, (sources, vips)) in [(&many, &few), (&few, &many), (&many, &many), (&few, &few)]
        .into_iter()
        .enumerate()
    {
        fx.reload(&many_prefixes_config(sources, vips));
        for &x in sources.iter() {
            let name: &'static str = Box::leak(format!("out{x}").into_boxed_str());
            let host = format!("198.18.{x}.{}", 10 + round);
            fx.check(
                &format!("round {round}: SNAT from {host}"),
                // A port per round: the previous round's flow holds this one on the address.
                &Packet::udp(&host, 5000 + round as u16, "198.51.100.53", 53).build(),
                &Expect::session(
                    Reason::SessionNew,
                    Packet::udp(
                        &format!("203.0.113.{x}"),
                        5000 + round as u16,
                        "198.51.100.53",
                        53,
                    )
                    .build(),
                    &[(name, Dir::Original)],
                ),
            );
        }
        for &x in vips.iter() {
            let name: &'static str = Box::leak(format!("vip{x}").into_boxed_str());
            fx.check(
                &format!("round {round}: DNAT to VIP {x}"),
                &Packet::udp(CLIENT, 4000 + round as u16, &format!("198.18.200.{x}"), 53).build(),
                &Expect::forward(
                    name,
                    Packet::udp(CLIENT, 4000 + round as u16, &format!("198.18.201.{x}"), 53)
                        .build(),
                ),
            );
        }
        // Outside every prefix of this bank, including those only the other bank had.
        let outside = Packet::udp("198.18.13.9", 5000, "198.18.200.13", 53).build();
        fx.check(
            &format!("round {round}: neither a source nor a VIP"),
            &outside,
            &Expect::pass_unchanged(Reason::NoMatch, &outside),
        );
        if sources.len() == few.len() {
            let gone = Packet::udp("198.18.12.9", 5000, "198.51.100.53", 53).build();
            fx.check(
                &format!("round {round}: a source only the other bank had"),
                &gone,
                &Expect::pass_unchanged(Reason::NoMatch, &gone),
            );
        }
    }
}
