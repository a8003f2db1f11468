//! The maps this program shares with the agent. Names and sizes come from `nat_common::maps`
//! so both sides agree; the agent fills the tries and reads the counters.

use crate::newflow::NewFlow;
use aya_ebpf::{
    macros::map,
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf,
    },
};
use nat_common::{
    bypass::BypassSet,
    conntrack::{Endpoint, FlowKey, Mapping, Pool, Session, SnatRuleSet},
    events::EVENT_RING_BYTES,
    frag::{FragEntry, FragKey},
    maps::{
        banked, BankedPrefix, BANK_PREFIX_BITS, BPF_F_MMAPABLE, DEFAULT_MAX_SESSIONS,
        FORWARD_RESULT_SLOTS, IFACE_FLAG_SLOTS, MAX_BYPASS_PREFIXES, MAX_DNAT_PREFIXES,
        MAX_FRAGMENTS, MAX_INTERFACES, MAX_LOCAL_ADDRS, MAX_POOLS, MAX_RULES, MAX_SNAT_PREFIXES,
        PROGRAMS_LEN, REASON_SLOTS, RULE_BANKS,
    },
    ports::{PortBitmap, PortSpace, MAX_PORT_SPACES},
    prefilter::{BankFilters, FilterTable, PrefixFilter},
    route_cache::{RouteCacheEntry, RouteCacheResult, ROUTE_CACHE_SLOTS},
    rules::NatRuleSet,
    session_filter::SESSION_FILTER_SLOTS,
    stats::RuleCounters,
};

/// Which rule bank new decisions use (see `nat_common::maps::RULE_BANK`): entry 0 is 0 or 1.
#[map(name = "RULE_BANK")]
pub static RULE_BANK: Array<u32> = Array::with_max_entries(1, 0);

/// Rule bank -> which addresses can match anything in each of its rule tries (see
/// `nat_common::prefilter`): a lookup the filter rules out is skipped.
#[map(name = "RULE_FILTERS")]
pub static RULE_FILTERS: Array<BankFilters> = Array::with_max_entries(RULE_BANKS, 0);

/// Bank + destination prefix (network order) -> DNAT rules that can apply to it, in priority
/// order.
#[map(name = "DNAT_FORWARD")]
pub static DNAT_FORWARD: LpmTrie<BankedPrefix, NatRuleSet> =
    LpmTrie::with_max_entries(MAX_DNAT_PREFIXES * RULE_BANKS, 0);

/// Bank + source prefix (network order) of backends -> reverse rules restoring the VIP on
/// replies.
#[map(name = "DNAT_REVERSE")]
pub static DNAT_REVERSE: LpmTrie<BankedPrefix, NatRuleSet> =
    LpmTrie::with_max_entries(MAX_DNAT_PREFIXES * RULE_BANKS, 0);

/// Per-rule packet and byte counters, indexed by the rule's counter slot.
#[map(name = "RULE_COUNTERS")]
pub static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Packets per exit [`Reason`].
#[map(name = "REASON_COUNTERS")]
pub static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_SLOTS, 0);

/// Original-direction tuple -> session. Non-LRU on purpose: nothing is evicted behind the
/// agent's back, so a flow's two directions never come apart; when full, new flows are refused.
#[map(name = "SESSIONS")]
pub static SESSIONS: HashMap<FlowKey, Session> = HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

/// Reply-direction tuple -> original-direction tuple (the key of the flow's session).
#[map(name = "REPLIES")]
pub static REPLIES: HashMap<FlowKey, FlowKey> = HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

/// Per slot of `nat_common::session_filter::slot`: how many `SESSIONS` and `REPLIES` keys fall
/// in it (see `nat_common::session_filter`). A packet whose slot counts zero belongs to no
/// session. Mmapable so that the agent takes counts back with real atomic adds on the memory
/// the kernel adds to.
#[map(name = "SESSION_FILTER")]
pub static SESSION_FILTER: Array<u64> =
    Array::with_max_entries(SESSION_FILTER_SLOTS, BPF_F_MMAPABLE);

/// Inside endpoint -> its external endpoint (endpoint-independent mapping, RFC 4787 REQ-1).
#[map(name = "MAPPINGS")]
pub static MAPPINGS: HashMap<Endpoint, Mapping> =
    HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

/// External endpoint -> inside endpoint: the claim on an external port, taken with
/// insert-if-absent so two CPUs can never hand out the same port.
#[map(name = "BINDINGS")]
pub static BINDINGS: HashMap<Endpoint, Endpoint> =
    HashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

/// External address + protocol -> slot of its free-port index in [`PORT_BITMAPS`]. Only the
/// agent writes it (the kernel cannot allocate an 8 KiB bitmap); a space without an entry is
/// allocated by random probing.
#[map(name = "PORT_SPACES")]
pub static PORT_SPACES: HashMap<PortSpace, u32> = HashMap::with_max_entries(MAX_PORT_SPACES, 0);

/// The free-port indexes: one bitmap of claimed ports (and of full words) per slot. A hint,
/// `BINDINGS` is the truth (see `nat_common::ports`). Mmapable so that the agent clears bits
/// with real atomic AND on the same memory the kernel ORs into, without losing either write.
#[map(name = "PORT_BITMAPS")]
pub static PORT_BITMAPS: Array<PortBitmap> =
    Array::with_max_entries(MAX_PORT_SPACES, BPF_F_MMAPABLE);

/// Bank + source prefix -> SNAT rules that can apply to it, in priority order.
#[map(name = "SNAT_RULES")]
pub static SNAT_RULES: LpmTrie<BankedPrefix, SnatRuleSet> =
    LpmTrie::with_max_entries(MAX_SNAT_PREFIXES * RULE_BANKS, 0);

/// Pool id -> external addresses and port range of an SNAT rule. Each bank owns
/// `MAX_POOLS` ids; the rule sets of a bank point only at that bank's pools.
#[map(name = "SNAT_POOLS")]
pub static SNAT_POOLS: Array<Pool> = Array::with_max_entries(MAX_POOLS * RULE_BANKS, 0);

/// Bank + destination prefix -> `[[bypass]]` entries that can apply to it: traffic passed to
/// the kernel untouched before anything else is looked at.
#[map(name = "BYPASS")]
pub static BYPASS: LpmTrie<BankedPrefix, BypassSet> =
    LpmTrie::with_max_entries(MAX_BYPASS_PREFIXES * RULE_BANKS, 0);

/// Entry 0: prefixes containing every address of [`LOCAL_ADDRS`] (see
/// `nat_common::maps::LOCAL_FILTER`).
#[map(name = "LOCAL_FILTER")]
pub static LOCAL_FILTER: Array<PrefixFilter> = Array::with_max_entries(1, 0);

/// This host's addresses and directed broadcasts (network order) -> 1, kept current by the
/// agent: a packet addressed to one of them never starts an SNAT session.
#[map(name = "LOCAL_ADDRS")]
pub static LOCAL_ADDRS: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// A datagram as it arrived (addresses, protocol, IP id) -> the addresses its first fragment
/// was translated to, so later fragments get the same (see `frag`). LRU on purpose: it is a
/// cache, and an evicted entry only sends a later fragment the unmatched way.
#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

/// The rule bank this program run decides with. Read once per run: a flip by the agent
/// in the middle of a run must not mix two rule sets.
#[inline(always)]
pub fn rule_bank() -> u32 {
    match RULE_BANK.get(0) {
        Some(&bank) if bank < RULE_BANKS => bank,
        _ => 0,
    }
}

/// Longest-prefix lookup of `addr` in `bank` of one of the rule tries, `table` naming which
/// (for its prefilter: a lookup that cannot find anything is not made).
///
/// The bank's filters are read here, at every lookup, on purpose: it is an array lookup the
/// verifier inlines (a few instructions). Reading them once with the bank and carrying the
/// pointer through the run was tried: the verifier then tracks that pointer along every path
/// and loading the object took minutes instead of seconds.
#[inline(always)]
pub fn rule_lookup<V>(
    trie: &'static LpmTrie<BankedPrefix, V>,
    table: FilterTable,
    bank: u32,
    addr: [u8; 4],
) -> Option<&'static V> {
    if let Some(filters) = RULE_FILTERS.get(bank) {
        if !filters.tables[table as usize].may_match(addr) {
            return None;
        }
    }
    trie.get(Key::new(32 + BANK_PREFIX_BITS, banked(bank, addr)))
}

/// Slot 0: the new-flow program (`xdp_nat_new_flow`); slot 1: the rules program
/// (`xdp_nat_rules`); slot 2: the ICMP error program (`xdp_nat_icmp_error`); slot 3: the
/// port-claim program (`xdp_nat_claim`). Installed by the agent.
#[map(name = "PROGRAMS")]
pub static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROGRAMS_LEN, 0);

/// The TC programs' stages, at the slots of [`PROGRAMS`] (a tail call reaches only programs of
/// its own type). Filled by the agent.
#[map(name = "TC_PROGRAMS")]
pub static TC_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROGRAMS_LEN, 0);

/// Per-CPU hand-over from `xdp_nat` to the new-flow program: the decision taken for the packet
/// being tail-called. Valid only during that tail call (same CPU, same packet).
#[map(name = "NEW_FLOW")]
pub static NEW_FLOW: PerCpuArray<NewFlow> = PerCpuArray::with_max_entries(1, 0);

/// Ingress interface index -> `FORWARD_*` flags with `IFACE_KNOWN` (see
/// `nat_common::maps::IFACE_FLAGS`): the fast copy of [`IFACE_FORWARD`].
#[map(name = "IFACE_FLAGS")]
pub static IFACE_FLAGS: Array<u32> = Array::with_max_entries(IFACE_FLAG_SLOTS, 0);

/// Ingress interface index -> `FORWARD_*` flags (absent: the kernel forwards).
#[map(name = "IFACE_FORWARD")]
pub static IFACE_FORWARD: HashMap<u32, u32> = HashMap::with_max_entries(MAX_INTERFACES, 0);

/// Per-CPU hand-over from `xdp_nat` to `xdp_nat_too_big`: the MTU of the route the packet
/// being tail-called is too big for. Valid only during that tail call.
#[map(name = "TOO_BIG_MTU")]
pub static TOO_BIG_MTU: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Entry 0: the smallest MTU of this host's interfaces (see `nat_common::maps`).
#[map(name = "PATH_MTU_FLOOR")]
pub static PATH_MTU_FLOOR: Array<u32> = Array::with_max_entries(1, 0);

/// Session events for the agent's event log (see `nat_common::events`).
#[map(name = "SESSION_EVENTS")]
pub static SESSION_EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Entry 0: `EVENTS_ON` when the event log is on. Written by the agent.
#[map(name = "EVENT_CONFIG")]
pub static EVENT_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Entry 0: session events dropped because the ring buffer was full.
#[map(name = "EVENT_DROPS")]
pub static EVENT_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Packets per [`ForwardResult`]: what happened to translated packets after translation.
#[map(name = "FORWARD_COUNTERS")]
pub static FORWARD_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(FORWARD_RESULT_SLOTS, 0);

/// The FIB answers the forwarding stage reuses, per CPU, direct-mapped by
/// `nat_common::route_cache::slot` (see `nat_common::route_cache`). Per CPU so that an entry
/// is written and read by one program run at a time: never torn.
#[map(name = "ROUTE_CACHE")]
pub static ROUTE_CACHE: PerCpuArray<RouteCacheEntry> =
    PerCpuArray::with_max_entries(ROUTE_CACHE_SLOTS, 0);

/// Entry 0: the route cache's generation (`GENERATION_OFF`: cache off). Written by the agent.
#[map(name = "ROUTE_CACHE_GEN")]
pub static ROUTE_CACHE_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Packets per [`RouteCacheResult`]: forwarding-stage route questions answered by the cache or
/// asked of the FIB and remembered.
#[map(name = "ROUTE_COUNTERS")]
pub static ROUTE_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(RouteCacheResult::COUNT, 0);
