//! Names and sizes of the maps the kernel program declares; the agent opens them by these names.

/// LPM trie, key: [`BankedPrefix`] of the destination, value: [`crate::rules::NatRuleSet`].
pub const DNAT_FORWARD: &str = "DNAT_FORWARD";
/// LPM trie, key: [`BankedPrefix`] of the source, value: [`crate::rules::NatRuleSet`].
pub const DNAT_REVERSE: &str = "DNAT_REVERSE";

/// Array of one `u32`: the rule bank (0 or 1) the programs translate new packets with.
///
/// Every rule table (the DNAT tries, `SNAT_RULES`, `SNAT_POOLS`) holds two banks. The agent
/// writes a new rule set into the bank not in use and then flips this one value, so a packet
/// always sees one complete rule set, never a half-applied change. Each program run reads it
/// once and makes its whole decision in that bank.
pub const RULE_BANK: &str = "RULE_BANK";
/// Number of rule banks.
pub const RULE_BANKS: u32 = 2;

/// Array indexed by rule bank, value: [`crate::prefilter::BankFilters`]: which addresses can
/// match anything in each rule trie of that bank, so the program skips lookups that would find
/// nothing. Written by the agent with the bank's tries, before the flip. Not pinned: a new
/// program generation starts with every filter unknown (always look up) until its agent
/// writes them.
pub const RULE_FILTERS: &str = "RULE_FILTERS";

/// The data part of a rule trie key: the bank byte, then the IPv4 address (network order).
/// The key's prefix length counts the bank byte, so a /24 in bank 1 is stored as
/// `Key::new(8 + 24, [1, a, b, c, 0])` and looked up with `Key::new(40, [1, a, b, c, d])`.
pub type BankedPrefix = [u8; 5];

/// Bits of a [`BankedPrefix`] taken by the bank.
pub const BANK_PREFIX_BITS: u32 = 8;

/// The trie key data for `addr` in `bank`.
#[inline(always)]
pub const fn banked(bank: u32, addr: [u8; 4]) -> BankedPrefix {
    [bank as u8, addr[0], addr[1], addr[2], addr[3]]
}

/// The `SNAT_POOLS` index of pool `index` of `bank`: each bank owns [`MAX_POOLS`] entries.
#[inline(always)]
pub const fn banked_pool(bank: u32, index: u32) -> u32 {
    bank * MAX_POOLS + index
}
/// Per-CPU array indexed by rule counter slot, value: [`crate::stats::RuleCounters`].
pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
/// Per-CPU array indexed by [`crate::stats::Reason`], value: packet count (u64). Sized
/// [`REASON_SLOTS`], not by the number of reasons, so adding a reason keeps the pinned layout.
pub const REASON_COUNTERS: &str = "REASON_COUNTERS";
/// Entries of [`REASON_COUNTERS`]: room for reasons yet to come.
pub const REASON_SLOTS: u32 = 64;
/// Entries of [`FORWARD_COUNTERS`]: room for forwarding results yet to come.
pub const FORWARD_RESULT_SLOTS: u32 = 16;

/// Ring buffer of [`crate::events::SessionEvent`]s (session created), read by the agent when
/// the event log is on.
pub const SESSION_EVENTS: &str = "SESSION_EVENTS";
/// Array of one `u32`: [`crate::events::EVENTS_ON`] turns the create events on.
pub const EVENT_CONFIG: &str = "EVENT_CONFIG";
/// Per-CPU array of one `u64`: events dropped because the ring buffer was full.
pub const EVENT_DROPS: &str = "EVENT_DROPS";

/// Array of one `u32`: the smallest MTU of this host's interfaces (0: unknown), written by the
/// agent. Only DF packets longer than this are checked against their route's MTU.
pub const PATH_MTU_FLOOR: &str = "PATH_MTU_FLOOR";

/// Version of the state pinned across restarts (`[agent] state_dir`): the layout and meaning
/// of every pinned map. Bump it with any change to a pinned map's key, value or size, or to
/// the meaning of its contents; an agent never reuses state of another version (see
/// `nat-agent/src/dataplane/pinned.rs`). A test records the layout it stands for.
pub const STATE_SCHEMA: u32 = 2;

/// Most distinct prefixes one bank of each DNAT trie holds (the trie holds both banks).
pub const MAX_DNAT_PREFIXES: u32 = 16_384;
/// Rule counter slots: the most rules a config may have.
pub const MAX_RULES: u32 = 4_096;

/// The XDP program's name in the object: the one attached to interfaces.
pub const XDP_PROGRAM: &str = "xdp_nat";
/// The XDP program that creates sessions, reached from [`XDP_PROGRAM`] by tail call. Split off
/// so each program stays within the verifier's complexity limit, and so the established-flow
/// path carries none of the allocation code.
pub const XDP_NEW_FLOW_PROGRAM: &str = "xdp_nat_new_flow";
/// The XDP program that evaluates the rules for packets that may start a session (stateful
/// DNAT, DNAT with an SNAT check, SNAT), reached from [`XDP_PROGRAM`] by tail call.
pub const XDP_RULES_PROGRAM: &str = "xdp_nat_rules";
/// The XDP program that translates ICMP errors (the quoted datagram included), reached from
/// [`XDP_PROGRAM`] by tail call for every unfragmented or first-fragment ICMP error it sees.
pub const XDP_ICMP_ERROR_PROGRAM: &str = "xdp_nat_icmp_error";
/// The XDP program that claims a new external port for a new SNAT flow, reached from
/// [`XDP_NEW_FLOW_PROGRAM`] by tail call (and calling it back). Split off because the claim
/// and the session creation together exceed one BPF stack frame.
pub const XDP_CLAIM_PROGRAM: &str = "xdp_nat_claim";
/// Benchmark baseline in the object: parses like [`XDP_PROGRAM`] and passes. Never attached.
pub const XDP_PARSE_PASS_PROGRAM: &str = "xdp_parse_pass";
/// Benchmark floor of a stateful translation: parse and one `SESSIONS` lookup; passes on a
/// hit. Never attached by the agent.
pub const XDP_SESSION_LOOKUP_PROGRAM: &str = "xdp_bench_session_lookup";
/// Benchmark floor of a stateless translation: parse and one `DNAT_FORWARD` lookup; passes on
/// a hit. Never attached by the agent.
pub const XDP_RULE_LOOKUP_PROGRAM: &str = "xdp_bench_rule_lookup";
/// Benchmark floor of a new SNAT flow: parse and the four inserts (`SESSIONS`, `REPLIES`,
/// `MAPPINGS`, `BINDINGS`) with all-zero values; passes when all four went in. Never attached
/// by the agent.
pub const XDP_NEW_FLOW_INSERTS_PROGRAM: &str = "xdp_bench_new_flow_inserts";
/// Program array the agent fills: slot [`NEW_FLOW_SLOT`] holds [`XDP_NEW_FLOW_PROGRAM`], slot
/// [`RULES_SLOT`] holds [`XDP_RULES_PROGRAM`], slot [`ICMP_ERROR_SLOT`] holds
/// [`XDP_ICMP_ERROR_PROGRAM`], slot [`CLAIM_SLOT`] holds [`XDP_CLAIM_PROGRAM`].
pub const PROGRAMS: &str = "PROGRAMS";
/// Slots in [`PROGRAMS`].
pub const PROGRAMS_LEN: u32 = 5;
/// Slot of the new-flow program in [`PROGRAMS`].
pub const NEW_FLOW_SLOT: u32 = 0;
/// Slot of the rules program in [`PROGRAMS`].
pub const RULES_SLOT: u32 = 1;
/// Slot of the ICMP error program in [`PROGRAMS`].
pub const ICMP_ERROR_SLOT: u32 = 2;
/// Slot of the port-claim program in [`PROGRAMS`].
pub const CLAIM_SLOT: u32 = 3;
/// The XDP program that answers a packet too big for its translated route with ICMP
/// "fragmentation needed", reached by tail call from [`XDP_PROGRAM`].
pub const XDP_TOO_BIG_PROGRAM: &str = "xdp_nat_too_big";
/// Slot of the too-big program in [`PROGRAMS`].
pub const TOO_BIG_SLOT: u32 = 4;

/// The TC (`cls_bpf`, attached at ingress through TCX) twin of [`XDP_PROGRAM`], for interfaces
/// whose hook is `tc`: the same translation on socket buffers, so that GSO/GRO super-packets
/// (64 KB of TCP at a time on veth and virtio-net) are translated once each instead of per
/// 1500-byte frame. Attaching XDP to a veth takes segmentation offload away from its peer;
/// attaching this does not.
pub const TC_PROGRAM: &str = "tc_nat";
/// TC twin of [`XDP_RULES_PROGRAM`], in [`TC_PROGRAMS`] at [`RULES_SLOT`].
pub const TC_RULES_PROGRAM: &str = "tc_nat_rules";
/// TC twin of [`XDP_NEW_FLOW_PROGRAM`], in [`TC_PROGRAMS`] at [`NEW_FLOW_SLOT`].
pub const TC_NEW_FLOW_PROGRAM: &str = "tc_nat_new_flow";
/// TC twin of [`XDP_ICMP_ERROR_PROGRAM`], in [`TC_PROGRAMS`] at [`ICMP_ERROR_SLOT`].
pub const TC_ICMP_ERROR_PROGRAM: &str = "tc_nat_icmp_error";
/// TC twin of [`XDP_CLAIM_PROGRAM`], in [`TC_PROGRAMS`] at [`CLAIM_SLOT`].
pub const TC_CLAIM_PROGRAM: &str = "tc_nat_claim";
/// TC twin of [`XDP_TOO_BIG_PROGRAM`], in [`TC_PROGRAMS`] at [`TOO_BIG_SLOT`].
pub const TC_TOO_BIG_PROGRAM: &str = "tc_nat_too_big";
/// Program array of the TC programs, with the slots of [`PROGRAMS`]. A tail call only reaches
/// programs of its own type, so the TC chain has its own table.
pub const TC_PROGRAMS: &str = "TC_PROGRAMS";

/// Hash, key: original-direction [`crate::conntrack::FlowKey`], value:
/// [`crate::conntrack::Session`]. Capacity set by the agent (`max_sessions`).
pub const SESSIONS: &str = "SESSIONS";
/// Hash, key: reply-direction [`crate::conntrack::FlowKey`], value: original-direction key.
pub const REPLIES: &str = "REPLIES";
/// Hash, key: inside [`crate::conntrack::Endpoint`], value: [`crate::conntrack::Mapping`].
pub const MAPPINGS: &str = "MAPPINGS";
/// Hash, key: external [`crate::conntrack::Endpoint`], value: inside endpoint (port claims).
pub const BINDINGS: &str = "BINDINGS";
/// LPM trie, key: [`BankedPrefix`] of the source, value: [`crate::conntrack::SnatRuleSet`].
pub const SNAT_RULES: &str = "SNAT_RULES";
/// Array indexed by pool id ([`banked_pool`]), value: [`crate::conntrack::Pool`].
pub const SNAT_POOLS: &str = "SNAT_POOLS";

/// Hash, key: [`crate::ports::PortSpace`] (external address and protocol), value: the slot of
/// its free-port index in [`PORT_BITMAPS`]. Written by the agent only; a space without an
/// entry is allocated by probing.
pub const PORT_SPACES: &str = "PORT_SPACES";
/// Array (`BPF_F_MMAPABLE`) of [`crate::ports::PortBitmap`], indexed by the slots of
/// [`PORT_SPACES`]. The kernel sets and clears bits with BPF atomics; the agent maps it into
/// its memory and clears bits with the CPU's atomics on the same words.
pub const PORT_BITMAPS: &str = "PORT_BITMAPS";
/// Array (`BPF_F_MMAPABLE`) of `u64` indexed by [`crate::session_filter::slot`]: how many
/// `SESSIONS` and `REPLIES` keys fall in each slot (see [`crate::session_filter`]). Pinned with
/// the tables it counts.
pub const SESSION_FILTER: &str = "SESSION_FILTER";
/// `BPF_F_MMAPABLE` (uapi): the array's memory can be mapped into user space.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Default capacity of the session table (and of the mapping and binding tables).
pub const DEFAULT_MAX_SESSIONS: u32 = 262_144;
/// Most distinct SNAT source prefixes per bank.
pub const MAX_SNAT_PREFIXES: u32 = 4_096;
/// Most SNAT pools per bank (one per SNAT rule).
pub const MAX_POOLS: u32 = 1_024;

/// Hash, key: ingress interface index, value: `FORWARD_*` flags of that interface (absent: the
/// kernel forwards translated packets).
pub const IFACE_FORWARD: &str = "IFACE_FORWARD";
/// [`IFACE_FORWARD`] flag: translated packets arriving on this interface leave straight from
/// XDP (FIB lookup, MAC rewrite, TTL decrement, redirect or XDP_TX).
pub const FORWARD_XDP: u32 = 1;
/// Most interfaces in [`IFACE_FORWARD`].
pub const MAX_INTERFACES: u32 = 256;
/// Array indexed by ingress interface index (below [`IFACE_FLAG_SLOTS`]), value: `FORWARD_*`
/// flags with [`IFACE_KNOWN`]. The same facts as [`IFACE_FORWARD`], read on every translated
/// packet: an array lookup is inlined by the verifier, a hash lookup is a call and a hash (about
/// 20 ns). An entry without [`IFACE_KNOWN`] (a new program generation before its agent wrote
/// it, an interface index too large) sends the program to [`IFACE_FORWARD`]. Not pinned.
pub const IFACE_FLAGS: &str = "IFACE_FLAGS";
/// Interface indexes [`IFACE_FLAGS`] covers.
pub const IFACE_FLAG_SLOTS: u32 = 4_096;
/// [`IFACE_FLAGS`] flag: this entry is written and authoritative.
pub const IFACE_KNOWN: u32 = 1 << 31;
/// Per-CPU array indexed by [`crate::stats::ForwardResult`], value: packet count (u64).
pub const FORWARD_COUNTERS: &str = "FORWARD_COUNTERS";
/// Per-CPU array of [`crate::route_cache::ROUTE_CACHE_SLOTS`]
/// [`crate::route_cache::RouteCacheEntry`]: the FIB answers the forwarding stage reuses (see
/// `route_cache`). Written only by the program. Not pinned.
pub const ROUTE_CACHE: &str = "ROUTE_CACHE";
/// Array of one u32: the route cache's generation, bumped by the agent on every routing
/// notification; [`crate::route_cache::GENERATION_OFF`] turns the cache off. Not pinned (a new
/// program generation starts with the cache off until its agent listens).
pub const ROUTE_CACHE_GEN: &str = "ROUTE_CACHE_GEN";
/// Per-CPU array indexed by [`crate::route_cache::RouteCacheResult`], value: packet count.
pub const ROUTE_COUNTERS: &str = "ROUTE_COUNTERS";

/// LRU hash, key: [`crate::frag::FragKey`] (a datagram as it arrived), value:
/// [`crate::frag::FragEntry`] (the addresses its first fragment was translated to). A cache:
/// not pinned, lost with the program (later fragments then go the unmatched way).
pub const FRAGMENTS: &str = "FRAGMENTS";
/// Capacity of [`FRAGMENTS`]: datagrams in flight whose later fragments are still to come.
pub const MAX_FRAGMENTS: u32 = 8_192;

/// LPM trie, key: [`BankedPrefix`] of the destination, value: [`crate::bypass::BypassSet`].
pub const BYPASS: &str = "BYPASS";
/// Most distinct destination prefixes of `[[bypass]]` entries per bank.
pub const MAX_BYPASS_PREFIXES: u32 = 256;

/// Hash, key: an IPv4 address of this host or a directed broadcast address of one of its
/// subnets (network order), value: 1. Filled and kept current by the agent; a packet to one
/// of them never starts an SNAT session (reason `local_destination`).
pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
/// Capacity of [`LOCAL_ADDRS`].
pub const MAX_LOCAL_ADDRS: u32 = 1_024;
/// Array of one [`crate::prefilter::PrefixFilter`]: prefixes that contain every address of
/// [`LOCAL_ADDRS`], so most packets (to remote hosts) learn they are not addressed to this
/// host without the hash lookup. The agent makes it "always look up" while it changes
/// `LOCAL_ADDRS`, and writes the cover after. Not pinned (a new program generation starts at
/// "unknown": look up).
pub const LOCAL_FILTER: &str = "LOCAL_FILTER";
