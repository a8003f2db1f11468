//! Parsing the options of one rule (`-A CHAIN <options>`) into what it matches and does.
//!
//! Only what the config can express is parsed into [`Rule`]; every other option, match module,
//! negation or target option becomes a problem naming it. The parser keeps going after a
//! problem so the report lists everything wrong with a line at once; the options of an
//! unsupported match module or target are skipped up to the next core option, since their
//! arity is unknown.

use ipnet::Ipv4Net;

use super::{
    target::{self, Target, TargetOptions},
    values,
};
use crate::model::{is_interface_name, PortRange};

/// A `-p` match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// `-p all`: the same as no match.
    All,
    /// `-p tcp`.
    Tcp,
    /// `-p udp`.
    Udp,
    /// `-p icmp`.
    Icmp,
}

impl Protocol {
    fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "all" | "0" => Ok(Protocol::All),
            "tcp" | "6" => Ok(Protocol::Tcp),
            "udp" | "17" => Ok(Protocol::Udp),
            "icmp" | "1" => Ok(Protocol::Icmp),
            _ => Err(format!(
                "-p {s}: the appliance translates tcp, udp and icmp only"
            )),
        }
    }

    /// The config's `protocol` value; `None` for any.
    pub(super) fn config_name(self) -> Option<&'static str> {
        match self {
            Protocol::All => None,
            Protocol::Tcp => Some("tcp"),
            Protocol::Udp => Some("udp"),
            Protocol::Icmp => Some("icmp"),
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// What a rule matches and does, as far as the config can express it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Rule {
    /// `-s`.
    pub source: Option<Ipv4Net>,
    /// `-d`.
    pub destination: Option<Ipv4Net>,
    /// `-i`.
    pub in_interface: Option<String>,
    /// `-o`.
    pub out_interface: Option<String>,
    /// `-p`.
    pub protocol: Option<Protocol>,
    /// `--dport`.
    pub dport: Option<PortRange>,
    /// `-m comment --comment`.
    pub comment: Option<String>,
    /// `-j`; `None` for a rule that only counts.
    pub target: Option<Target>,
}

/// Parses the options of a rule; the problems are empty when everything was understood.
pub(super) fn parse(words: &[String]) -> (Rule, Vec<String>) {
    let mut p = Parser {
        words,
        pos: 0,
        rule: Rule::default(),
        problems: Vec::new(),
        target: None,
        target_options: TargetOptions::default(),
    };
    p.run();
    let options = std::mem::take(&mut p.target_options);
    p.rule.target = options.resolve(p.target.as_deref(), &mut p.problems);
    (p.rule, p.problems)
}

/// Options that always belong to iptables itself, never to a match module or target: where
/// skipping an unknown module's or target's options stops.
const CORE_OPTIONS: &[&str] = &[
    "-s",
    "--source",
    "--src",
    "-d",
    "--destination",
    "--dst",
    "-i",
    "--in-interface",
    "-o",
    "--out-interface",
    "-p",
    "--protocol",
    "-m",
    "--match",
    "-j",
    "--jump",
    "-g",
    "--goto",
    "-f",
    "--fragment",
    "-c",
    "--set-counters",
];

struct Parser<'a> {
    words: &'a [String],
    pos: usize,
    rule: Rule,
    problems: Vec<String>,
    target: Option<String>,
    target_options: TargetOptions,
}

impl<'a> Parser<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let w = self.words.get(self.pos)?;
        self.pos += 1;
        Some(w.as_str())
    }

    fn problem(&mut self, message: impl Into<String>) {
        self.problems.push(message.into());
    }

    fn run(&mut self) {
        while let Some(word) = self.next() {
            let (negated, option) = if word == "!" {
                match self.next() {
                    Some(option) => (true, option),
                    None => {
                        self.problem("`!` at the end of the rule negates nothing");
                        return;
                    }
                }
            } else {
                (false, word)
            };
            if !self.option(option, negated) {
                return;
            }
        }
    }

    /// The value of `option`; `None` (after reporting it) at the end of the rule.
    fn value(&mut self, option: &str) -> Option<&'a str> {
        let v = self.next();
        if v.is_none() {
            self.problem(format!("{option} needs a value"));
        }
        v
    }

    /// Handles one option; `false` when parsing cannot go on.
    fn option(&mut self, option: &'a str, negated: bool) -> bool {
        if negated && !matches!(option, "-m" | "--match" | "-j" | "--jump") {
            // The value still has to be consumed; a bare flag has none.
            let takes_value = !matches!(option, "-f" | "--fragment" | "--syn");
            let shown = if takes_value {
                match self.value(option) {
                    Some(v) => format!("! {option} {v}"),
                    None => return false,
                }
            } else {
                format!("! {option}")
            };
            self.problem(format!(
                "negated match `{shown}` cannot be expressed: the config's matches are \
                 positive only"
            ));
            return true;
        }
        match option {
            "-s" | "--source" | "--src" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                let parsed = values::prefix(v);
                self.set_once(option, parsed, |r| &mut r.source);
            }
            "-d" | "--destination" | "--dst" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                let parsed = values::prefix(v);
                self.set_once(option, parsed, |r| &mut r.destination);
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                let parsed = interface(v);
                if matches!(option, "-i" | "--in-interface") {
                    self.set_once(option, parsed, |r| &mut r.in_interface);
                } else {
                    self.set_once(option, parsed, |r| &mut r.out_interface);
                }
            }
            "-p" | "--protocol" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                let parsed = Protocol::parse(v);
                self.set_once(option, parsed, |r| &mut r.protocol);
            }
            "-m" | "--match" => {
                let Some(module) = self.value(option) else {
                    return false;
                };
                if negated {
                    self.problem(format!("`! {option} {module}` is not valid iptables"));
                }
                self.module(module);
            }
            "-j" | "--jump" => {
                let Some(target) = self.value(option) else {
                    return false;
                };
                if negated {
                    self.problem(format!("`! {option} {target}` is not valid iptables"));
                }
                if let Some(first) = &self.target {
                    let first = first.clone();
                    self.problem(format!("two targets: -j {first} and -j {target}"));
                }
                self.target = Some(target.to_string());
            }
            "-g" | "--goto" => {
                let Some(chain) = self.value(option) else {
                    return false;
                };
                self.problem(format!(
                    "-g {chain}: jumps into user-defined chains are not followed"
                ));
            }
            "-f" | "--fragment" => self.problem(
                "-f (non-first fragments only) cannot be expressed: the appliance matches \
                 fragments by their first fragment's ports",
            ),
            // Counters of `iptables -S -v`; they carry no meaning for the config.
            "-c" | "--set-counters" => {
                for _ in 0..2 {
                    if self.value(option).is_none() {
                        return false;
                    }
                }
            }
            "--dport" | "--destination-port" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                if !self.rule.protocol.is_some_and(Protocol::has_ports) {
                    self.problem(format!("{option} needs -p tcp or -p udp before it"));
                }
                let parsed = values::match_ports(v);
                self.set_once(option, parsed, |r| &mut r.dport);
            }
            "--sport" | "--source-port" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                self.problem(format!(
                    "{option} {v}: the config's rules do not match source ports"
                ));
            }
            "--syn" | "--tcp-flags" | "--tcp-option" => {
                let arity = match option {
                    "--syn" => 0,
                    "--tcp-flags" => 2,
                    _ => 1,
                };
                for _ in 0..arity {
                    if self.value(option).is_none() {
                        return false;
                    }
                }
                self.problem(format!(
                    "{option}: TCP flag and option matches are not supported (the appliance \
                     translates every packet of a flow)"
                ));
            }
            "--icmp-type" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                self.problem(format!(
                    "--icmp-type {v}: the config's ICMP rules match ICMP queries of every type"
                ));
            }
            "--comment" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                let comment = Ok(v.to_string());
                self.set_once(option, comment, |r| &mut r.comment);
            }
            "--to-destination" | "--to-source" | "--to-ports" | "--to" => {
                let Some(v) = self.value(option) else {
                    return false;
                };
                let o = &mut self.target_options;
                let list = match option {
                    "--to-destination" => &mut o.to_destination,
                    "--to-source" => &mut o.to_source,
                    "--to-ports" => &mut o.to_ports,
                    _ => &mut o.to,
                };
                list.push(v.to_string());
            }
            "--random" => self.target_options.flags.random = true,
            "--random-fully" => self.target_options.flags.random_fully = true,
            "--persistent" => self.target_options.flags.persistent = true,
            other if other.starts_with('-') => {
                // An unsupported target reports itself; its options need no line each.
                if !self.target.as_deref().is_some_and(target::is_unsupported) {
                    self.problem(format!("unknown option {other}"));
                }
                self.skip_foreign_options();
            }
            other => self.problem(format!("unexpected word {other:?}")),
        }
        true
    }

    /// Stores `parsed` in the field `field` picks, reporting a parse error or a repeat.
    fn set_once<T>(
        &mut self,
        option: &str,
        parsed: Result<T, String>,
        field: impl FnOnce(&mut Rule) -> &mut Option<T>,
    ) {
        match parsed {
            Err(message) => self.problem(format!("{option}: {message}")),
            Ok(value) => {
                let slot = field(&mut self.rule);
                if slot.is_some() {
                    self.problem(format!("{option} is given twice"));
                } else {
                    *slot = Some(value);
                }
            }
        }
    }

    fn module(&mut self, module: &str) {
        match module {
            "tcp" | "udp" => {
                let wanted = if module == "tcp" {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                if self.rule.protocol != Some(wanted) {
                    self.problem(format!("-m {module} needs -p {module} before it"));
                }
            }
            "icmp" if self.rule.protocol != Some(Protocol::Icmp) => {
                self.problem("-m icmp needs -p icmp before it");
            }
            "icmp" | "comment" => {}
            other => {
                let why = match other {
                    "state" | "conntrack" => {
                        "connection-state matches are not supported (the appliance translates \
                         new flows and keeps their sessions itself)"
                    }
                    "multiport" => "write one rule per port, or a --dport N:M range",
                    _ => "the config cannot express it",
                };
                self.problem(format!("match -m {other} is not supported: {why}"));
                self.skip_foreign_options();
            }
        }
    }

    /// Skips the options of a match module or target this parser does not know, up to the
    /// next core option (or a `!` before one).
    fn skip_foreign_options(&mut self) {
        while let Some(word) = self.words.get(self.pos) {
            let next_is_core = self
                .words
                .get(self.pos + 1)
                .is_some_and(|w| CORE_OPTIONS.contains(&w.as_str()));
            if CORE_OPTIONS.contains(&word.as_str()) || (word == "!" && next_is_core) {
                return;
            }
            self.pos += 1;
        }
    }
}

/// `-i`/`-o` value: a plain interface name (no `+` wildcard).
fn interface(name: &str) -> Result<String, String> {
    if name.ends_with('+') {
        Err(format!(
            "{name}: interface wildcards cannot be expressed; name each interface"
        ))
    } else if !is_interface_name(name) {
        Err(format!("{name:?} is not a valid interface name"))
    } else {
        Ok(name.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::import::iptables::target::TargetFlags;

    fn parse_line(s: &str) -> (Rule, Vec<String>) {
        let words = super::super::lex::words(s).unwrap();
        parse(&words)
    }

    fn ok(s: &str) -> Rule {
        let (rule, problems) = parse_line(s);
        assert!(problems.is_empty(), "{s}: {problems:?}");
        rule
    }

    fn problems(s: &str) -> Vec<String> {
        let (_, problems) = parse_line(s);
        assert!(!problems.is_empty(), "{s} parsed without problems");
        problems
    }

    #[test]
    fn seed_dnat_rule() {
        let r = ok(
            "-d 172.16.2.65/32 -i eth0 -p tcp -m tcp --dport 80 -j DNAT \
                    --to-destination 172.16.3.5:80",
        );
        assert_eq!(r.destination, Some("172.16.2.65/32".parse().unwrap()));
        assert_eq!(r.in_interface.as_deref(), Some("eth0"));
        assert_eq!(r.protocol, Some(Protocol::Tcp));
        assert_eq!(r.dport, Some(PortRange { min: 80, max: 80 }));
        let Some(Target::Dnat(to, flags)) = r.target else {
            panic!("{:?}", r.target)
        };
        assert_eq!(to.addresses.unwrap().0, Ipv4Addr::new(172, 16, 3, 5));
        assert_eq!(to.ports, Some(PortRange { min: 80, max: 80 }));
        assert_eq!(flags, TargetFlags::default());
    }

    #[test]
    fn seed_masquerade_rule() {
        let r = ok("-s 192.168.1.0/24 -o eth0 -j MASQUERADE");
        assert_eq!(r.source, Some("192.168.1.0/24".parse().unwrap()));
        assert_eq!(r.out_interface.as_deref(), Some("eth0"));
        assert_eq!(
            r.target,
            Some(Target::Masquerade(None, TargetFlags::default()))
        );
    }

    #[test]
    fn long_options_ranges_and_target_options() {
        let r = ok(
            "--destination 198.18.100.0/24 --protocol udp --destination-port 8000:8009 \
                    --jump DNAT --to-destination 198.18.1.2:9000-9009/8000 --persistent",
        );
        assert_eq!(
            r.dport,
            Some(PortRange {
                min: 8000,
                max: 8009
            })
        );
        let Some(Target::Dnat(to, flags)) = r.target else {
            panic!()
        };
        assert_eq!(to.base, Some(8000));
        assert!(flags.persistent);

        let r = ok("-s 198.18.0.0/24 -d 203.0.113.250/32 -p udp -j SNAT \
                    --to-source 203.0.113.1-203.0.113.2:1024-2047 --random-fully");
        assert!(matches!(r.target, Some(Target::Snat(_, f)) if f.random_fully));
        let r = ok("-s 198.18.0.0/24 -j MASQUERADE --to-ports 1024-65535 --random");
        assert!(matches!(
            r.target,
            Some(Target::Masquerade(Some(PortRange { min: 1024, max: 65535 }), f)) if f.random
        ));
        let r = ok("-d 198.18.101.0/24 -j NETMAP --to 198.18.9.0/24");
        assert_eq!(
            r.target,
            Some(Target::Netmap("198.18.9.0/24".parse().unwrap()))
        );
        assert_eq!(
            ok("-s 198.18.0.0/24 -j RETURN").target,
            Some(Target::Return)
        );
        assert_eq!(ok("-j ACCEPT").target, Some(Target::Accept));
        assert_eq!(ok("-s 198.18.0.0/24").target, None);
        // `iptables -S -v` counters; protocol numbers.
        let r = ok("-c 10 600 -p 6 --dport 22 -j REDIRECT");
        assert_eq!(r.protocol, Some(Protocol::Tcp));
        assert_eq!(r.target, Some(Target::Other("REDIRECT".into())));
    }

    #[test]
    fn comments_are_unquoted() {
        let r = ok(r#"-d 198.18.100.10/32 -m comment --comment "web front \"a\"" -j ACCEPT"#);
        assert_eq!(r.comment.as_deref(), Some(r#"web front "a""#));
        let r = ok("-m comment --comment vip1 -d 198.18.100.10/32 -j ACCEPT");
        assert_eq!(r.comment.as_deref(), Some("vip1"));
    }

    #[test]
    fn negations_are_named() {
        let p = problems("! -s 198.18.0.0/24 -j MASQUERADE");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("! -s 198.18.0.0/24"), "{p:?}");
        let p = problems("-p tcp -m tcp ! --dport 22 -j ACCEPT");
        assert!(p[0].contains("! --dport 22"), "{p:?}");
        let p = problems("! -f -j ACCEPT");
        assert!(p[0].contains("! -f"), "{p:?}");
        assert!(problems("-s 1.2.3.4 !")[0].contains("negates nothing"));
    }

    #[test]
    fn unsupported_matches_skip_their_options() {
        let p = problems(
            "-p tcp -m state --state NEW,ESTABLISHED -m tcp --dport 80 -j DNAT \
                          --to-destination 198.18.1.2",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("-m state"));
        let p = problems("-p tcp -m multiport --dports 80,443 ! -d 1.2.3.4 -j ACCEPT");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("-m multiport") && p[1].contains("! -d 1.2.3.4"));
        let p = problems("-m mark --mark 0x1 -j ACCEPT");
        assert_eq!(p.len(), 1, "{p:?}");
        let p = problems("-p tcp --sport 1024:65535 --syn -j ACCEPT");
        assert_eq!(p.len(), 2, "{p:?}");
        let p = problems("-p icmp -m icmp --icmp-type 8 -j ACCEPT");
        assert!(p[0].contains("--icmp-type 8"), "{p:?}");
    }

    #[test]
    fn unknown_targets_keep_their_options_quiet() {
        let r = ok("-j LOG --log-prefix \"nat: \" --log-level 4");
        assert_eq!(r.target, Some(Target::Other("LOG".into())));
    }

    #[test]
    fn malformed_rules_are_named() {
        for (line, needle) in [
            ("-d", "-d needs a value"),
            ("-d 1.2.3.4 -d 1.2.3.5 -j ACCEPT", "given twice"),
            ("-d nope -j ACCEPT", "-d: \"nope\""),
            ("-p sctp -j ACCEPT", "tcp, udp and icmp"),
            ("--dport 80 -j ACCEPT", "needs -p tcp"),
            ("-p udp -m tcp --dport 80 -j ACCEPT", "-m tcp needs -p tcp"),
            ("-i eth+ -j ACCEPT", "wildcards"),
            ("-o a/b -j ACCEPT", "not a valid interface name"),
            ("-j DNAT", "--to-destination is missing"),
            (
                "-j DNAT --to-destination 1.2.3.4 --to-destination 1.2.3.5",
                "2 times",
            ),
            (
                "-j DNAT --to-destination 1.2.3.4 --to-ports 80",
                "does not belong",
            ),
            ("-j SNAT --to-source :", "--to-source:"),
            ("-j MASQUERADE --to-ports 9-1", "backwards"),
            ("-j NETMAP --to x", "--to:"),
            ("-j ACCEPT -j RETURN", "two targets"),
            ("--to-source 1.2.3.4", "without a -j target"),
            ("-g MYCHAIN", "not followed"),
            ("-f -j ACCEPT", "fragments"),
            ("--bogus 1 -j ACCEPT", "unknown option --bogus"),
            ("hello -j ACCEPT", "unexpected word"),
            ("-j ACCEPT -c 1", "-c needs a value"),
        ] {
            let p = problems(line);
            assert!(p.iter().any(|m| m.contains(needle)), "{line}: {p:?}");
        }
    }
}
