//! State that outlives the agent: the maps, the rule-slot table and the XDP links, pinned in a
//! bpf filesystem under `[agent] state_dir`.
//!
//! Layout: `<state_dir>/v<STATE_SCHEMA>/` holds one pin per map in [`PINNED_MAPS`] (by map
//! name), `RULE_SLOTS` (counter slot -> rule id, so counters stay with their rules), one
//! `PROGRAMS_<tag>` per program generation (a program array whose last user reference goes
//! away is emptied by the kernel, so the tail-call table of the program that is attached must
//! stay pinned while it runs) and likewise `TC_PROGRAMS_<tag>` for the TC programs' table when
//! the object has one, and `link_<interface>` per attachment, an XDP or a TCX link (bpffs
//! refuses dots in names, so the interface name is `%XX`-escaped where needed). While the
//! links are pinned the program keeps translating with no agent running; a new agent reuses
//! the maps, loads its programs and swaps them into each link atomically (`bpf_link_update`).
//!
//! A directory of another schema, or a pinned map whose type or sizes differ from what this
//! agent's object declares (a changed `max_sessions`, say), is never reused and never
//! removed behind the operator's back: the agent refuses to start and names the explicit way
//! out, `nat-agent state clear`, which detaches and removes everything (sessions are lost).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, Map, MapData},
    programs::links::PinnedLink,
};
use nat_common::maps::{
    BINDINGS, DNAT_FORWARD, DNAT_REVERSE, FORWARD_COUNTERS, IFACE_FORWARD, MAPPINGS, MAX_RULES,
    REASON_COUNTERS, REPLIES, RULE_BANK, RULE_COUNTERS, SESSIONS, SESSION_FILTER, SNAT_POOLS,
    SNAT_RULES, STATE_SCHEMA,
};

/// `statfs` magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The maps kept across restarts: sessions (with the filter that counts their keys), rules (both banks and the bank switch), counters
/// and per-interface settings. `PROGRAMS` and `TC_PROGRAMS` are pinned per program generation
/// (see the module doc); the new-flow scratch and the log buffer belong to one program and are
/// not kept.
pub const PINNED_MAPS: [&str; 14] = [
    SESSIONS,
    REPLIES,
    SESSION_FILTER,
    MAPPINGS,
    BINDINGS,
    DNAT_FORWARD,
    DNAT_REVERSE,
    SNAT_RULES,
    SNAT_POOLS,
    RULE_BANK,
    RULE_COUNTERS,
    REASON_COUNTERS,
    FORWARD_COUNTERS,
    IFACE_FORWARD,
];

/// Pin name of the slot table: counter slot -> rule id (0: no rule ever held it).
pub const RULE_SLOTS: &str = "RULE_SLOTS";

// bpffs refuses names with a '.', which interface names may have (VLANs: `eth0.100`).
const LINK_PREFIX: &str = "link_";
const PROGRAMS_PREFIX: &str = "PROGRAMS_";
// Not a prefix of the other: each names one table's generations only.
const TC_PROGRAMS_PREFIX: &str = "TC_PROGRAMS_";

/// An interface name as a bpffs file name: bytes other than letters, digits, `-` and `_`
/// as `%XX`.
fn encode_name(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The inverse of [`encode_name`]; `None` for a name it never produces.
fn decode_name(encoded: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut bytes = encoded.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// What a map must look like to be reused: from the object this agent embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// The shape of every pinned map as declared by `object` (the embedded XDP object), with the
/// connection-tracking maps sized `max_sessions` as the loader will create them.
pub fn expected_shapes(object: &[u8], max_sessions: u32) -> Result<BTreeMap<String, MapShape>> {
    let obj = aya_obj::Object::parse(object).context("parsing the embedded XDP object")?;
    let mut shapes = BTreeMap::new();
    for name in PINNED_MAPS {
        let Some(map) = obj.maps.get(name) else {
            // An object without connection tracking lacks some; nothing to pin for those.
            continue;
        };
        let conntrack = [SESSIONS, REPLIES, MAPPINGS, BINDINGS].contains(&name);
        shapes.insert(
            name.to_string(),
            MapShape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: if conntrack {
                    max_sessions
                } else {
                    map.max_entries()
                },
            },
        );
    }
    Ok(shapes)
}

fn shape_of(data: &MapData) -> Result<MapShape> {
    let info = data.info().context("reading the map's info")?;
    Ok(MapShape {
        map_type: info.map_type().context("map type")? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// The versioned state directory of this agent.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
    /// Whether pinned state from an earlier run was found (and checked).
    pub reused: bool,
}

/// The directory of this schema under `root`.
pub fn schema_dir(root: &Path) -> PathBuf {
    root.join(format!("v{STATE_SCHEMA}"))
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let st =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

fn clear_hint(root: &Path) -> String {
    format!(
        "to start afresh, run `nat-agent state clear --state-dir {}` (it detaches the program \
         and removes the pinned maps: the sessions are lost)",
        root.display()
    )
}

impl StateDir {
    /// Opens (creating it if needed) the state directory of this schema under `root`, which
    /// must be on a bpf filesystem, and checks any pinned map against `expected`.
    pub fn open(root: &Path, expected: &BTreeMap<String, MapShape>) -> Result<Self> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating the state directory {}", root.display()))?;
        if !is_bpffs(root)? {
            bail!(
                "[agent] state_dir {} is not on a bpf filesystem; mount one first (`mount -t \
                 bpf bpf /sys/fs/bpf`; systemd does at boot) or leave state_dir out to run \
                 without state that survives the agent",
                root.display()
            );
        }
        let dir = schema_dir(root);
        let mine = dir.file_name().map(|n| n.to_os_string());
        for entry in
            std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let text = name.to_string_lossy();
            if text.starts_with('v') && Some(&name) != mine.as_ref() {
                bail!(
                    "{} holds pinned state of schema {text}, which this agent (schema \
                     v{STATE_SCHEMA}) cannot use; the program of that state may still be \
                     attached and translating. {}",
                    root.display(),
                    clear_hint(root)
                );
            }
        }
        let reused = dir.exists();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let state = StateDir { dir, reused };
        for (name, want) in expected {
            let path = state.map_path(name);
            if !path.exists() {
                continue;
            }
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            let have = shape_of(&data).with_context(|| path.display().to_string())?;
            if have != *want {
                bail!(
                    "the pinned map {} ({have}) does not match this agent's ({want}); a \
                     changed [conntrack] max_sessions does this. Restore the old value, or {}",
                    path.display(),
                    clear_hint(root)
                );
            }
        }
        Ok(state)
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Where the link of `interface` is pinned.
    pub fn link_path(&self, interface: &str) -> PathBuf {
        self.dir
            .join(format!("{LINK_PREFIX}{}", encode_name(interface)))
    }

    /// Where this program generation's `PROGRAMS` is pinned.
    pub fn programs_path(&self, tag: &str) -> PathBuf {
        self.dir.join(format!("{PROGRAMS_PREFIX}{tag}"))
    }

    /// Where this program generation's `TC_PROGRAMS` is pinned.
    pub fn tc_programs_path(&self, tag: &str) -> PathBuf {
        self.dir.join(format!("{TC_PROGRAMS_PREFIX}{tag}"))
    }

    /// The pinned tail-call tables (XDP and TC) other than those in `keep`: those of other
    /// program generations.
    pub fn other_programs(&self, keep: &[&Path]) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
        {
            let path = entry?.path();
            let is_programs = path
                .file_name()
                .is_some_and(|n| is_program_table(&n.to_string_lossy()));
            if is_programs && !keep.contains(&path.as_path()) {
                out.push(path);
            }
        }
        Ok(out)
    }

    /// (interface, pin path) of every pinned link.
    pub fn pinned_links(&self) -> Result<Vec<(String, PathBuf)>> {
        links_in(&self.dir)
    }

    /// The slot table, reused or created (and pinned).
    pub fn rule_slots(&self) -> Result<Array<MapData, u32>> {
        let path = self.map_path(RULE_SLOTS);
        if !path.exists() {
            Array::<MapData, u32>::create(MAX_RULES, 0)
                .context("creating the slot table")?
                .pin(&path)
                .with_context(|| format!("pinning the slot table at {}", path.display()))?;
        }
        {
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            let shape = shape_of(&data)?;
            if (shape.key_size, shape.value_size, shape.max_entries) != (4, 4, MAX_RULES) {
                bail!(
                    "the pinned slot table {} has the wrong shape ({shape})",
                    path.display()
                );
            }
            Array::try_from(Map::Array(data)).with_context(|| format!("opening {}", path.display()))
        }
    }
}

/// Whether a pin name is that of a generation's tail-call table, XDP or TC.
fn is_program_table(name: &str) -> bool {
    name.starts_with(PROGRAMS_PREFIX) || name.starts_with(TC_PROGRAMS_PREFIX)
}

fn links_in(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(iface) = name.strip_prefix(LINK_PREFIX).and_then(decode_name) {
            out.push((iface, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Detaches a pinned link: unpinning it drops the last reference, which detaches the program.
pub fn unpin_link(path: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(path)
        .with_context(|| format!("opening the pinned link {}", path.display()))?;
    let fd = link
        .unpin()
        .with_context(|| format!("unpinning {}", path.display()))?;
    drop(fd);
    Ok(())
}

/// What [`clear`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Interfaces the program was detached from.
    pub detached: Vec<String>,
    /// Pins removed (maps, slot tables, program tables).
    pub removed: usize,
}

/// Detaches every pinned link and removes every pin of every schema under `root`: the
/// explicit way out of an incompatible or unwanted state. Sessions are lost.
pub fn clear(root: &Path) -> Result<Cleared> {
    let mut cleared = Cleared::default();
    if !root.exists() {
        return Ok(cleared);
    }
    for entry in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let dir = entry?.path();
        if !dir.is_dir() {
            continue;
        }
        for (iface, path) in links_in(&dir)? {
            unpin_link(&path)?;
            cleared.detached.push(iface);
        }
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            cleared.removed += 1;
        }
        std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(cleared)
}

/// Detaches every pinned link of this schema under `root` and keeps the maps (a later start
/// reuses the sessions).
pub fn detach(root: &Path) -> Result<Vec<String>> {
    let dir = schema_dir(root);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut detached = Vec::new();
    for (iface, path) in links_in(&dir)? {
        unpin_link(&path)?;
        detached.push(iface);
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_survive_the_bpffs_encoding() {
        for name in ["eth0", "eth0.100", "br-lan_1", "a%b", "veth@x"] {
            let encoded = encode_name(name);
            assert!(!encoded.contains('.'), "{encoded}");
            assert_eq!(decode_name(&encoded).as_deref(), Some(name));
        }
        assert_eq!(decode_name("bad%2"), None);
    }

    #[test]
    fn both_tail_call_tables_of_a_generation_are_recognised_and_distinct() {
        let state = StateDir {
            dir: PathBuf::from("/x/v2"),
            reused: false,
        };
        let (xdp, tc) = (state.programs_path("17"), state.tc_programs_path("17"));
        assert_ne!(xdp, tc);
        for path in [&xdp, &tc] {
            let name = path.file_name().unwrap().to_string_lossy();
            assert!(is_program_table(&name), "{name}");
        }
        for name in ["link_eth0", "SESSIONS", "RULE_SLOTS", "IFACE_FORWARD"] {
            assert!(!is_program_table(name), "{name}");
        }
    }

    /// The layout `STATE_SCHEMA` stands for. When this fails, a pinned map changed: bump
    /// `nat_common::maps::STATE_SCHEMA` (old state is then refused, not misread) and record
    /// the new layout here.
    const LAYOUT_V2: &str = concat!(
        "BINDINGS:1:8:8:1024 DNAT_FORWARD:11:9:324:32768 DNAT_REVERSE:11:9:324:32768 ",
        "FORWARD_COUNTERS:6:4:8:16 IFACE_FORWARD:1:4:4:256 MAPPINGS:1:8:16:1024 ",
        "REASON_COUNTERS:6:4:8:64 REPLIES:1:16:16:1024 RULE_BANK:2:4:4:1 ",
        "RULE_COUNTERS:6:4:32:4096 SESSIONS:1:16:80:1024 SESSION_FILTER:2:4:8:65536 SNAT_POOLS:2:4:264:2048 ",
        "SNAT_RULES:11:9:388:8192"
    );

    #[test]
    fn the_pinned_layout_is_the_one_the_schema_version_stands_for() {
        let shapes = expected_shapes(crate::dataplane::EBPF_OBJECT, 1024).unwrap();
        let layout: Vec<String> = shapes
            .iter()
            .map(|(n, s)| {
                format!(
                    "{n}:{}:{}:{}:{}",
                    s.map_type, s.key_size, s.value_size, s.max_entries
                )
            })
            .collect();
        assert_eq!(STATE_SCHEMA, 2, "record the layout of the new schema below");
        assert_eq!(layout.join(" "), LAYOUT_V2);
    }
}
