//! Mangled configs through the agent's loader, generated: a property test of "a bad config is
//! reported, never a crash".
//!
//! The configs the project ships (`deploy/`) are mangled at random: a value replaced by one
//! from a list of edge cases (out-of-range numbers, negative and huge ones, empty and
//! oversized strings, prefixes that are not prefixes, port ranges backwards, wrong types), a
//! line deleted or repeated, two lines swapped, a key renamed, bytes inserted. Each mangled
//! text goes through `load_config_text`, the path `nat-agent run`, `check` and `reload` share
//! (parse, validate, compile), and must come back as a config or as an error that says
//! something, without a panic. A config it accepts must compile the same way twice (nothing
//! depends on more than the text).
//!
//! Seeded, so a run is reproducible; a failure is shrunk to the smallest mangling. No root
//! needed.

use std::{
    cell::Cell,
    panic::{catch_unwind, AssertUnwindSafe},
};

use nat_agent::load_config_text;

#[path = "common/props.rs"]
mod props;
use proptest::prelude::*;

/// The configs the project ships that load as they are.
const SHIPPED: [(&str, &str); 6] = [
    ("lab", include_str!("../../deploy/examples/lab.toml")),
    (
        "dnat-masquerade",
        include_str!("../../deploy/examples/dnat-masquerade.toml"),
    ),
    (
        "snat-egress",
        include_str!("../../deploy/examples/snat-egress.toml"),
    ),
    ("aws", include_str!("../../deploy/aws/nat.toml")),
    ("azure", include_str!("../../deploy/azure/nat.toml")),
    ("onprem", include_str!("../../deploy/onprem/nat.toml")),
];

/// The package's config: a template that names no interface until the operator does, so it
/// does not load as it is; mangled too, as it is and with its comments taken for settings.
const PACKAGE: &str = include_str!("../../deploy/packaging/nat.toml");

/// Values a setting may be given instead of its own.
const EDGE_VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551616",
    "1e99",
    "nan",
    "true",
    "\"\"",
    "\" \"",
    "\"0.0.0.0/0\"",
    "\"0.0.0.0\"",
    "\"255.255.255.255\"",
    "\"198.18.0.0/33\"",
    "\"198.18.0.1/24\"",
    "\"198.18.0.0/15\"",
    "\"203.0.113.1-203.0.113.0\"",
    "\"1024-65535\"",
    "\"65535-1024\"",
    "\"0-0\"",
    "\"80-\"",
    "\"::1\"",
    "\"2001:db8::/32\"",
    "\"eth0\"",
    "\"lo\"",
    "\"a-very-long-interface-name\"",
    "\"tcp\"",
    "\"udp\"",
    "\"icmp\"",
    "\"gre\"",
    "\"auto\"",
    "\"tc\"",
    "\"xdp\"",
    "\"kernel\"",
    "\"1s\"",
    "\"-5s\"",
    "\"99999999999999h\"",
    "\"/dev/null\"",
    "\"\\u0000\"",
    "[]",
    "[1, 2]",
    "[\"a\", 1]",
    "{}",
    "{ a = 1 }",
];

/// One change to a config text.
#[derive(Debug, Clone)]
enum Edit {
    /// The value of the n-th `key = value` line (modulo their count) replaced by
    /// `EDGE_VALUES[value]`.
    Value { line: usize, value: usize },
    /// The n-th line deleted.
    Delete(usize),
    /// The n-th line written twice.
    Repeat(usize),
    /// Two lines swapped.
    Swap(usize, usize),
    /// The key of the n-th `key = value` line replaced by another line's key.
    Rekey { line: usize, from: usize },
    /// Bytes inserted at a position (modulo the text's length).
    Insert { at: usize, bytes: Vec<u8> },
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        6 => (any::<usize>(), 0..EDGE_VALUES.len())
            .prop_map(|(line, value)| Edit::Value { line, value }),
        1 => any::<usize>().prop_map(Edit::Delete),
        1 => any::<usize>().prop_map(Edit::Repeat),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(line, from)| Edit::Rekey { line, from }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
    ];
    prop::collection::vec(edit, 1..5)
}

/// The package config with its commented-out settings switched on: the file documents every
/// setting that way, so mangling it reaches them all (it documents alternatives side by side,
/// so it need not load).
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.contains(" = ") || rest.starts_with('[') => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn apply(seed: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
    let settings = |lines: &[String]| -> Vec<usize> {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.trim_start().starts_with('#') && l.contains(" = "))
            .map(|(i, _)| i)
            .collect()
    };
    let mut tail_bytes: Vec<(usize, Vec<u8>)> = Vec::new();
    for edit in edits {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match edit {
            Edit::Value { line, value } => {
                let found = settings(&lines);
                if let Some(&i) = found.get(line % found.len().max(1)) {
                    let key = lines[i].split(" = ").next().unwrap_or_default().to_string();
                    lines[i] = format!("{key} = {}", EDGE_VALUES[*value]);
                }
            }
            Edit::Delete(i) => {
                lines.remove(i % n);
            }
            Edit::Repeat(i) => {
                let line = lines[i % n].clone();
                lines.insert(i % n, line);
            }
            Edit::Swap(a, b) => lines.swap(a % n, b % n),
            Edit::Rekey { line, from } => {
                let found = settings(&lines);
                if found.is_empty() {
                    continue;
                }
                let (i, j) = (found[line % found.len()], found[from % found.len()]);
                let key = lines[j].split(" = ").next().unwrap_or_default().to_string();
                let value = lines[i].split_once(" = ").map(|(_, v)| v.to_string());
                if let Some(value) = value {
                    lines[i] = format!("{key} = {value}");
                }
            }
            Edit::Insert { at, bytes } => tail_bytes.push((*at, bytes.clone())),
        }
    }
    let mut text = lines.join("\n").into_bytes();
    for (at, bytes) in tail_bytes {
        let at = at % (text.len() + 1);
        text.splice(at..at, bytes);
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[test]
fn mangled_configs_are_reported_never_a_crash() {
    for (name, text) in SHIPPED {
        if let Err(e) = load_config_text(name, text) {
            panic!("the shipped config {name} does not load: {e}");
        }
    }
    let mut seeds: Vec<(&str, String)> = SHIPPED
        .iter()
        .map(|(name, text)| (*name, text.to_string()))
        .collect();
    seeds.push(("package", PACKAGE.to_string()));
    seeds.push(("package, comments taken for settings", uncommented(PACKAGE)));
    let mut runner = props::seeded_runner(10_000);
    let (accepted, refused) = (Cell::new(0u32), Cell::new(0u32));
    let result = runner.run(&(0..seeds.len(), edits()), |(seed, edits)| {
        let (name, text) = &seeds[seed];
        let mangled = apply(text, &edits);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            load_config_text("mangled.toml", &mangled)
        }));
        let Ok(loaded) = outcome else {
            return Err(TestCaseError::fail(format!(
                "loading a mangled {name} config panicked:\n{mangled}"
            )));
        };
        match loaded {
            Ok(first) => {
                accepted.set(accepted.get() + 1);
                let again = load_config_text("mangled.toml", &mangled)
                    .map_err(|e| TestCaseError::fail(format!("accepted once, then: {e}")))?;
                prop_assert_eq!(
                    format!("{:?}", first.compiled),
                    format!("{:?}", again.compiled),
                    "the same text compiled two ways:\n{}",
                    mangled
                );
            }
            Err(e) => {
                refused.set(refused.get() + 1);
                let message = e.to_string();
                prop_assert!(
                    message.contains("mangled.toml") && message.len() > "mangled.toml".len() + 8,
                    "an error that does not say where or what: {:?}\n{}",
                    message,
                    mangled
                );
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Both outcomes must have been tested: mangled configs the loader accepted (a value that
    // is still valid, a line that was optional) and ones it refused.
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted >= 300 && refused >= 3000,
        "accepted {accepted}, refused {refused} mangled configs"
    );
}
