//! BPF_PROG_TEST_RUN harness: the real XDP object, loaded into the kernel with maps filled
//! from a TOML config by the agent's own validate + compile + apply path.
//!
//! The fixtures run the XDP program (`xdp_nat`), except in the test crates named `tc_*`, which
//! each include one fixture file whole and run it through the TC twin (`tc_nat`) instead: the
//! same frames, the same expectations (see [`Hook`]).
//!
//! Every [`Fixture`] owns its own loaded program and therefore its own maps, so tests running
//! in parallel threads never see each other's counters. Counters are compared as deltas
//! around each run, so several checks can share one fixture.

use aya::{
    maps::{Array, Map, MapData},
    programs::{ProgramError, TestRun, TestRunOptions, TestRunResult},
};
use nat_agent::{
    compile::{compile, Compiled},
    config::ConfigFile,
    dataplane::{
        Dataplane, KernelSessions, KvTable, LoadOptions, MemStore, SessionStore, StatsSnapshot,
        Walk,
    },
    load_config_text,
    model::{validate, Model},
    Loaded,
};
use nat_common::stats::{Reason, RuleCounters};

use super::packet::{assert_frames_eq, hex, verify_checksums, L4Check};

/// `XDP_DROP` (uapi `enum xdp_action`).
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`: back out of the interface the frame came in on.
pub const XDP_TX: u32 = 3;

/// Which of the two NAT programs a fixture runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `xdp_nat`.
    Xdp,
    /// `tc_nat` on a socket buffer. Its return codes are read as the XDP action they stand
    /// for: "next" as `XDP_PASS`, "shot" as `XDP_DROP`, "redirect" as `XDP_TX` (a test run
    /// sends nothing, so where `bpf_redirect` pointed is not seen; the fixtures' only redirect
    /// is an answer back out of the ingress interface).
    Tc,
}

impl Hook {
    /// The hook of this test crate: [`Hook::Tc`] in the crates named `tc_*`.
    pub fn of_this_crate() -> Hook {
        if env!("CARGO_CRATE_NAME").starts_with("tc_") {
            Hook::Tc
        } else {
            Hook::Xdp
        }
    }
}

/// `TC_ACT_UNSPEC` (TCX "next"), as a test run returns it.
const TC_ACT_UNSPEC: u32 = u32::MAX;
/// `TC_ACT_SHOT`.
const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`.
const TC_ACT_REDIRECT: u32 = 7;
/// Size of the uapi `struct __sk_buff` passed as a TC test run's context.
const SK_BUFF_CTX_LEN: usize = 192;
/// Offsets in it of `ingress_ifindex` and `ifindex`.
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;

/// Whether the kernel refuses (EINVAL) to build a test-run skb from `frame`: as measured on
/// Linux 6.18, a frame whose EtherType says IPv4 or IPv6 but which is too short for that
/// header (34 and 54 bytes with the Ethernet header), or shorter than an Ethernet header.
/// Such frames reach a real TC hook (a raw socket on a veth sends them); they cannot be
/// replayed into one by BPF_PROG_TEST_RUN.
fn kernel_builds_no_test_skb(frame: &[u8]) -> bool {
    use super::packet::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPV4_HLEN};
    if frame.len() < ETH_HLEN {
        return true;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IPV4 => frame.len() < ETH_HLEN + IPV4_HLEN,
        ETH_P_IPV6 => frame.len() < ETH_HLEN + 40,
        _ => false,
    }
}

/// One BPF_PROG_TEST_RUN of `frame` with context `ctx` through `run` (the program's own
/// `test_run`); the return value is the program's, unread.
fn test_run(
    frame: &[u8],
    ctx: Option<Vec<u8>>,
    run: impl FnOnce(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
) -> Result<RunOutput, ProgramError> {
    // Room for growth although the programs never grow a frame past its input length: the
    // kernel fails the run with ENOSPC rather than truncate silently, a clear message.
    let mut out = vec![0u8; frame.len() + 256];
    let result = run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx.as_deref(),
        ..TestRunOptions::new()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(RunOutput {
        action: result.return_value,
        frame: out,
    })
}

/// Name the fixture configs are validated under (appears in validation errors).
const FIXTURE_FILE: &str = "fixture.toml";

/// Which per-rule counters a translation bumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Towards the backend: `orig_packets` / `orig_bytes`, reason `DnatTranslated`.
    Original,
    /// A reply from the backend: `reply_packets` / `reply_bytes`, reason `DnatReplyTranslated`.
    Reply,
}

/// The SNAT fixtures' usual config: inside hosts 198.18.0.0/24 leaving as 203.0.113.1 (rule
/// "out"), default port range, a 1024-session table.
pub const SNAT_ONE_ADDRESS: &str = r#"
[[interfaces]]
name = "nat0"

[conntrack]
max_sessions = 1024

[[snat]]
id = 1
name = "out"
source = "198.18.0.0/24"
to_address = "203.0.113.1"
port_range = "1024-65535"
"#;

/// What one run must produce.
#[derive(Debug, Clone)]
pub struct Expect {
    /// XDP action.
    pub action: u32,
    /// The one reason counter that must go up by one (all others stay).
    pub reason: Reason,
    /// The exact output frame.
    pub output: Vec<u8>,
    /// The rule (by config name) whose counters must count this frame; every other rule's
    /// counters must stay.
    pub rule: Option<(&'static str, Dir)>,
    /// Further rules that must count this frame too (a session made by a DNAT and an SNAT
    /// rule counts its packets in both).
    pub also: Vec<(&'static str, Dir)>,
}

impl Expect {
    /// Translated towards the backend by rule `rule` into exactly `expected`.
    pub fn forward(rule: &'static str, expected: Vec<u8>) -> Self {
        Expect {
            action: XDP_PASS,
            reason: Reason::DnatTranslated,
            output: expected,
            rule: Some((rule, Dir::Original)),
            also: Vec::new(),
        }
    }

    /// A reply translated back to the VIP by rule `rule` into exactly `expected`.
    pub fn reply(rule: &'static str, expected: Vec<u8>) -> Self {
        Expect {
            action: XDP_PASS,
            reason: Reason::DnatReplyTranslated,
            output: expected,
            rule: Some((rule, Dir::Reply)),
            also: Vec::new(),
        }
    }

    /// A later fragment translated from the fragment cache into exactly `expected`, counted by
    /// every rule in `rules` (those that translated its first fragment) in their direction.
    pub fn fragment(expected: Vec<u8>, rules: &[(&'static str, Dir)]) -> Self {
        let (first, rest) = rules
            .split_first()
            .expect("fixture bug: a translated fragment counts in at least one rule");
        Expect {
            action: XDP_PASS,
            reason: Reason::FragmentTranslated,
            output: expected,
            rule: Some(*first),
            also: rest.to_vec(),
        }
    }

    /// Passed to the kernel byte for byte as it came in.
    pub fn pass_unchanged(reason: Reason, input: &[u8]) -> Self {
        Expect {
            action: XDP_PASS,
            reason,
            output: input.to_vec(),
            rule: None,
            also: Vec::new(),
        }
    }

    /// Translated by a session (`SessionNew`, `SessionOrig` or `SessionReply`) into exactly
    /// `expected`, counted by every rule in `rules` (at least one: the session's DNAT and/or
    /// SNAT rule) in its direction.
    pub fn session(reason: Reason, expected: Vec<u8>, rules: &[(&'static str, Dir)]) -> Self {
        let (first, rest) = rules
            .split_first()
            .expect("fixture bug: a session translation counts in at least one rule");
        Expect {
            action: XDP_PASS,
            reason,
            output: expected,
            rule: Some(*first),
            also: rest.to_vec(),
        }
    }

    /// Dropped; the frame the program leaves behind must still be the input (a drop must never
    /// follow a partial rewrite).
    pub fn drop_unchanged(reason: Reason, input: &[u8]) -> Self {
        Expect {
            action: XDP_DROP,
            reason,
            output: input.to_vec(),
            rule: None,
            also: Vec::new(),
        }
    }
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// XDP action returned by the program.
    pub action: u32,
    /// The frame after the program (what the kernel would pass on).
    pub frame: Vec<u8>,
}

/// One run with the counters read around it, before anything is asserted: for fixtures whose
/// expected frame depends on what the program chose (an allocated port, read back from the
/// maps). [`Fixture::verify`] then checks it like [`Fixture::check`] does.
#[derive(Debug, Clone)]
pub struct Observed {
    /// What the run produced.
    pub out: RunOutput,
    /// The input frame's length (rule counters count whole frames).
    input_len: usize,
    before: StatsSnapshot,
    after: StatsSnapshot,
}

impl Observed {
    /// The reason counters that changed in this run, with the change.
    pub fn reasons(&self) -> Vec<(Reason, u64)> {
        reason_deltas(&self.before, &self.after)
    }
}

/// What [`Fixture::check`] saw, for checks that span several frames (fragments).
#[derive(Debug, Clone)]
pub struct Checked {
    /// The output frame (already compared with the expected one).
    pub frame: Vec<u8>,
    /// For translations, what the from-scratch L4 checksum check found.
    pub l4: Option<L4Check>,
}

/// The loaded program with its maps filled from one config.
pub struct Fixture {
    dataplane: Dataplane,
    /// The validated config.
    pub model: Model,
    /// What was written into the maps.
    pub compiled: Compiled,
    /// `ingress_ifindex` passed in the run's context; `None`: no context (the kernel then uses
    /// the loopback device of the running thread's network namespace).
    ingress_ifindex: Option<u32>,
    /// The program the runs go through.
    hook: Hook,
}

impl Fixture {
    /// Validates and compiles `config_toml` like `nat-agent run` does, loads the XDP object and
    /// fills its maps. Panics (never skips) when BPF cannot be loaded: these tests exist to run
    /// the real program, and a silent skip would hide that they did not.
    pub fn load(config_toml: &str) -> Fixture {
        let Loaded {
            model, compiled, ..
        } = load_config_text(FIXTURE_FILE, config_toml)
            .unwrap_or_else(|e| panic!("fixture config is not valid:\n{e}"));
        // Sized like `nat-agent run` sizes them, so a fixture can fill a small table.
        let hook = Hook::of_this_crate();
        let options = LoadOptions {
            max_sessions: model.conntrack.max_sessions,
            // A TC crate runs only the TC programs: verifying the XDP ones too would double
            // every fixture's load time.
            load_xdp: hook == Hook::Xdp,
            ..Default::default()
        };
        let mut dataplane = Dataplane::load_with(&options).unwrap_or_else(|e| {
            panic!(
                "cannot load the XDP program: {e:#}\n\
                 These tests run the real program through BPF_PROG_TEST_RUN and need root \
                 (CAP_BPF, CAP_NET_ADMIN); they fail rather than skip."
            )
        });
        dataplane
            .apply(&compiled)
            .unwrap_or_else(|e| panic!("writing the compiled rules into the maps: {e:#}"));
        if hook == Hook::Tc {
            dataplane
                .load_tc()
                .unwrap_or_else(|e| panic!("loading the TC programs: {e:#}"));
        }
        Fixture {
            dataplane,
            model,
            compiled,
            ingress_ifindex: None,
            hook,
        }
    }

    /// Replaces the rules with those of `config_toml` the way the running agent applies a
    /// change: compiled with the counter slots of the rules that stay, written into the rule
    /// bank not in use, then switched to. The other sections must stay as loaded.
    pub fn reload(&mut self, config_toml: &str) {
        let raw = ConfigFile::parse(FIXTURE_FILE, config_toml)
            .unwrap_or_else(|e| panic!("fixture config does not parse: {e}"));
        let model = validate(FIXTURE_FILE, &raw)
            .unwrap_or_else(|e| panic!("fixture config does not validate:\n{e}"));
        let compiled = compile(&model, &self.compiled.slots)
            .unwrap_or_else(|p| panic!("fixture config does not compile: {p:?}"));
        self.dataplane
            .apply(&compiled)
            .unwrap_or_else(|e| panic!("applying the changed rules: {e:#}"));
        self.model = model;
        self.compiled = compiled;
    }

    /// Makes later runs arrive on interface `ifindex` (of the network namespace of the thread
    /// that runs them): the program's FIB lookups then start from that interface. `None`
    /// restores the default (no context passed).
    pub fn set_ingress_ifindex(&mut self, ifindex: Option<u32>) {
        self.ingress_ifindex = ifindex;
    }

    /// The connection-tracking tables of the loaded object (`SESSIONS`, `REPLIES`,
    /// `MAPPINGS`, `BINDINGS`), through the agent's own store.
    pub fn conntrack(&mut self) -> &mut KernelSessions {
        self.dataplane
            .sessions()
            .expect("the loaded object has no connection-tracking maps")
    }

    /// A copy of all four connection-tracking tables.
    pub fn conntrack_snapshot(&mut self) -> MemStore {
        let store = self.conntrack();
        MemStore {
            sessions: dump(store.sessions(), "SESSIONS"),
            replies: dump(store.replies(), "REPLIES"),
            mappings: dump(store.mappings(), "MAPPINGS"),
            bindings: dump(store.bindings(), "BINDINGS"),
        }
    }

    /// Checks that the session filter counts exactly the keys of `SESSIONS` and `REPLIES`:
    /// each slot's two halves are the numbers of keys of each table that fall in it (see
    /// `nat_common::session_filter`). Lower would make the program skip a session; higher
    /// would leave a slot looked up for nothing.
    pub fn assert_session_filter_exact(&mut self, what: &str) {
        use nat_common::session_filter::{slot, Counted, SESSION_FILTER_SLOTS};
        let state = self.conntrack_snapshot();
        let mut expected = std::collections::BTreeMap::<u32, u64>::new();
        for key in state.sessions.keys() {
            *expected.entry(slot(key)).or_default() += Counted::Sessions.unit();
        }
        for key in state.replies.keys() {
            *expected.entry(slot(key)).or_default() += Counted::Replies.unit();
        }
        let filter = self
            .conntrack()
            .filter()
            .expect("the loaded object has no session filter");
        let counted: std::collections::BTreeMap<u32, u64> = (0..SESSION_FILTER_SLOTS)
            .map(|s| (s, filter.count_at(s)))
            .filter(|&(_, count)| count != 0)
            .collect();
        assert_eq!(counted, expected, "{what}: session filter slot -> count");
        assert_eq!(filter.underflows(), 0, "{what}: uncounted entries deleted");
    }

    /// A second handle on the map `name` of this fixture's programs (found through
    /// the programs' map ids, so parallel fixtures never see each other's maps): for writes
    /// the agent's API does not offer, such as filling `SESSIONS` with synthetic entries.
    pub fn program_map(&mut self, name: &str) -> MapData {
        // The attached program first, then the port-claim program (the only user of
        // `BINDINGS` and the free-port index maps since it was split off).
        for program in [
            nat_common::maps::XDP_PROGRAM,
            nat_common::maps::XDP_CLAIM_PROGRAM,
        ] {
            let program = self
                .dataplane
                .loaded_program(program)
                .unwrap_or_else(|e| panic!("the loaded object has no program {program}: {e:#}"));
            let info = program
                .info()
                .unwrap_or_else(|e| panic!("reading the program's info: {e:#}"));
            let ids = info
                .map_ids()
                .unwrap_or_else(|e| panic!("reading the program's map ids: {e:#}"))
                .expect("the kernel reports no map ids for the program");
            for id in ids {
                let map =
                    MapData::from_id(id).unwrap_or_else(|e| panic!("opening map id {id}: {e:#}"));
                let map_name = map
                    .info()
                    .unwrap_or_else(|e| panic!("reading map id {id}'s info: {e:#}"))
                    .name_as_str()
                    .map(str::to_owned);
                if map_name.as_deref() == Some(name) {
                    return map;
                }
            }
        }
        panic!("neither xdp_nat nor xdp_nat_claim uses a map named {name:?}")
    }

    /// [`Fixture::program_map`] opened as an array of `V`.
    pub fn program_array<V: aya::Pod>(&mut self, name: &str) -> Array<MapData, V> {
        Array::try_from(Map::Array(self.program_map(name)))
            .unwrap_or_else(|e| panic!("opening {name} as an array: {e:#}"))
    }

    /// Writes interface `ifindex`'s entry of `IFACE_FLAGS` (the program's fast copy of which
    /// interfaces forward from XDP) as the agent would when attaching.
    pub fn set_interface_flags(&mut self, ifindex: u32, flags: u32) {
        self.program_array::<u32>(nat_common::maps::IFACE_FLAGS)
            .set(ifindex, flags, 0)
            .unwrap_or_else(|e| panic!("writing IFACE_FLAGS[{ifindex}]: {e:#}"));
    }

    /// [`Fixture::program_map`] as an `aya::maps::Map::HashMap`, ready for
    /// `aya::maps::HashMap::try_from`.
    pub fn program_hash_map(&mut self, name: &str) -> Map {
        Map::HashMap(self.program_map(name))
    }

    /// The counter slot of the (DNAT or SNAT) rule named `name` in the config.
    pub fn slot(&self, name: &str) -> u32 {
        let id = self
            .rules()
            .find(|(_, n)| *n == name)
            .map(|(id, _)| id)
            .unwrap_or_else(|| panic!("fixture bug: no rule named {name:?}"));
        self.compiled.slots[&id]
    }

    /// (id, name) of every rule, DNAT then SNAT.
    fn rules(&self) -> impl Iterator<Item = (u32, &str)> {
        let dnat = self.model.dnat.iter().map(|r| (r.id, r.name.as_str()));
        dnat.chain(self.model.snat.iter().map(|r| (r.id, r.name.as_str())))
    }

    /// The loaded dataplane, for checks on the session tables
    /// ([`Dataplane::sessions`]).
    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Reads every reason counter and every rule's counters.
    pub fn counters(&self) -> StatsSnapshot {
        self.dataplane
            .snapshot(self.compiled.slots.values().copied())
            .unwrap_or_else(|e| panic!("reading the counters: {e:#}"))
    }

    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN). `Err` is the kernel refusing the
    /// run, not the program's verdict.
    pub fn try_run(&self, frame: &[u8]) -> Result<RunOutput, ProgramError> {
        match self.hook {
            Hook::Xdp => {
                let program = self
                    .dataplane
                    .program()
                    .unwrap_or_else(|e| panic!("the loaded object has no XDP program: {e:#}"));
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex (all u32). The kernel wants data_meta 0, data_end equal to the
                // frame length and egress_ifindex 0 (net/bpf/test_run.c).
                let ctx: Option<Vec<u8>> = self.ingress_ifindex.map(|ifindex| {
                    [0, frame.len() as u32, 0, ifindex, 0, 0]
                        .iter()
                        .flat_map(|v| v.to_ne_bytes())
                        .collect()
                });
                test_run(frame, ctx, |options| program.test_run(options))
            }
            Hook::Tc => {
                let program = self
                    .dataplane
                    .classifier()
                    .unwrap_or_else(|e| panic!("the loaded object has no TC program: {e:#}"));
                // struct __sk_buff: all zero but the interface the skb arrived on (the kernel
                // refuses fields a test run cannot set).
                let ctx: Option<Vec<u8>> = self.ingress_ifindex.map(|ifindex| {
                    let mut ctx = vec![0u8; SK_BUFF_CTX_LEN];
                    for offset in [SK_BUFF_INGRESS_IFINDEX, SK_BUFF_IFINDEX] {
                        ctx[offset..offset + 4].copy_from_slice(&ifindex.to_ne_bytes());
                    }
                    ctx
                });
                let mut out = test_run(frame, ctx, |options| program.test_run(options))?;
                out.action = match out.action {
                    TC_ACT_UNSPEC => XDP_PASS,
                    TC_ACT_SHOT => XDP_DROP,
                    TC_ACT_REDIRECT => XDP_TX,
                    // Never returned by the program: shown as is (and fails any comparison).
                    other => other,
                };
                Ok(out)
            }
        }
    }

    /// Whether the kernel takes no test run of `frame` through this hook: none shorter than an
    /// Ethernet header, and on the TC hook none [`kernel_builds_no_test_skb`] names. Asserts
    /// that it still refuses, so that the exception goes once a kernel accepts such frames.
    pub fn kernel_refuses(&self, frame: &[u8]) -> bool {
        let refused = match self.hook {
            Hook::Xdp => frame.len() < super::packet::ETH_HLEN,
            Hook::Tc => kernel_builds_no_test_skb(frame),
        };
        if refused {
            assert!(
                self.try_run(frame).is_err(),
                "the kernel ran the {:?} program on a {}-byte frame it was expected to \
                 refuse; remove this exception from the harness",
                self.hook,
                frame.len()
            );
        }
        refused
    }

    /// Runs the program once on `frame`; panics if the kernel refuses the run.
    pub fn run(&self, frame: &[u8]) -> RunOutput {
        self.try_run(frame).unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN failed for a {}-byte frame: {e:#?}\n  frame: {}",
                frame.len(),
                hex(frame)
            )
        })
    }

    /// Runs `input` and checks everything in `expect`: action, exact output bytes, the reason
    /// counter (exactly one, by one) and the rule counters (exactly the named rule, one packet
    /// of the frame's length, in the named direction). For a translation it also recomputes the
    /// output's IP and L4 checksums from scratch and reports what the L4 check found.
    pub fn check(&self, what: &str, input: &[u8], expect: &Expect) -> Checked {
        if self.kernel_refuses(input) {
            // The program cannot be run on such a frame here (the TC one: the XDP crates run
            // it); that the kernel still refuses is checked.
            return Checked {
                frame: input.to_vec(),
                l4: None,
            };
        }
        let observed = self.observe(input);
        self.verify(what, &observed, expect)
    }

    /// Runs `input` once with the counters read before and after; nothing is asserted yet.
    pub fn observe(&self, input: &[u8]) -> Observed {
        let before = self.counters();
        let out = self.run(input);
        let after = self.counters();
        Observed {
            out,
            input_len: input.len(),
            before,
            after,
        }
    }

    /// Checks an [`Observed`] run against `expect`, exactly as [`Fixture::check`] does.
    pub fn verify(&self, what: &str, observed: &Observed, expect: &Expect) -> Checked {
        let (before, after, out) = (&observed.before, &observed.after, &observed.out);

        assert_eq!(
            (action_name(out.action), out.action),
            (action_name(expect.action), expect.action),
            "{what}: XDP action (expected exit reason {:?}); reason counter deltas: {:?}",
            expect.reason,
            reason_deltas(before, after)
        );
        // The reason first: it names the path the program took, the most telling message.
        self.assert_reason_delta(what, before, after, expect.reason);
        assert_frames_eq(&out.frame, &expect.output, what);
        let rules: Vec<(&'static str, Dir)> =
            expect.rule.iter().chain(&expect.also).copied().collect();
        self.assert_rule_deltas(what, before, after, &rules, observed.input_len as u64);

        // Separately from the byte comparison: a translated frame must be internally
        // consistent, whatever the expected frame says.
        let l4 = expect.rule.map(|_| {
            verify_checksums(&out.frame)
                .unwrap_or_else(|e| panic!("{what}: translated frame has a bad checksum: {e}"))
        });
        Checked {
            frame: out.frame.clone(),
            l4,
        }
    }

    fn assert_reason_delta(
        &self,
        what: &str,
        before: &StatsSnapshot,
        after: &StatsSnapshot,
        expected: Reason,
    ) {
        let deltas = reason_deltas(before, after);
        let want: Vec<(Reason, u64)> = vec![(expected, 1)];
        assert_eq!(deltas, want, "{what}: reason counters that changed");
    }

    fn assert_rule_deltas(
        &self,
        what: &str,
        before: &StatsSnapshot,
        after: &StatsSnapshot,
        rules: &[(&'static str, Dir)],
        frame_len: u64,
    ) {
        for (id, name) in self.rules() {
            let slot = self.compiled.slots[&id];
            let b = before.rules.get(&slot).copied().unwrap_or_default();
            let a = after.rules.get(&slot).copied().unwrap_or_default();
            let delta = RuleCounters {
                orig_packets: a.orig_packets - b.orig_packets,
                orig_bytes: a.orig_bytes - b.orig_bytes,
                reply_packets: a.reply_packets - b.reply_packets,
                reply_bytes: a.reply_bytes - b.reply_bytes,
            };
            let mut want = RuleCounters::default();
            for (rule, dir) in rules {
                if *rule != name {
                    continue;
                }
                match dir {
                    Dir::Original => {
                        want.orig_packets += 1;
                        want.orig_bytes += frame_len;
                    }
                    Dir::Reply => {
                        want.reply_packets += 1;
                        want.reply_bytes += frame_len;
                    }
                }
            }
            assert_eq!(
                delta, want,
                "{what}: counters of rule {name:?} (slot {slot})"
            );
        }
    }
}

/// The reasons whose counters changed between two snapshots, with the change.
fn reason_deltas(before: &StatsSnapshot, after: &StatsSnapshot) -> Vec<(Reason, u64)> {
    Reason::ALL
        .iter()
        .map(|&r| (r, after.reasons[r as usize] - before.reasons[r as usize]))
        .filter(|&(_, d)| d != 0)
        .collect()
}

/// Every entry of one connection-tracking table.
fn dump<K: Ord + Copy, V: Copy>(
    table: &mut dyn KvTable<K, V>,
    name: &str,
) -> std::collections::BTreeMap<K, V> {
    // A fixture is the only writer besides its own program runs, so one walk sees everything.
    match table
        .walk(None, usize::MAX)
        .unwrap_or_else(|e| panic!("walking {name}: {e:#}"))
    {
        Walk::Page { entries, next } => {
            assert!(next.is_none(), "{name}: walk stopped early");
            entries.into_iter().collect()
        }
        Walk::Lost => panic!("{name}: walk lost its cursor with no concurrent deletions"),
    }
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}
