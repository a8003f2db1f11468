//! The XDP pieces of `bench topology`: the generator (XDP live frames), the sinks' drop
//! program, the bare redirect forwarder, and the appliance itself (the agent's `Dataplane`,
//! loaded from a generated config exactly as `nat-agent run` loads it).
//!
//! Everything that names an interface runs on a thread inside that interface's namespace
//! (`nat_lab::in_netns`): interface names and indexes are per namespace.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::{xdp::XdpLinkId, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use nat_agent::{
    dataplane::{Dataplane, LoadOptions, SessionStore, EBPF_OBJECT},
    load_config_text,
    model::Interface,
    route_watch::RouteWatch,
    Loaded,
};
use nat_common::{
    bench::{GenConfig, BENCH_GEN, BENCH_GEN_SEQ, XDP_BENCH_GEN_PROGRAM},
    conntrack::{Endpoint, FlowKey},
    maps::{BINDINGS, MAPPINGS, REPLIES, SESSIONS},
    session_filter::Counted,
};
use nat_lab::in_netns;

/// Frames per live-frames batch (the kernel's default is 64).
const GEN_BATCH: u32 = 64;
/// Frames per `BPF_PROG_TEST_RUN` call: small enough that a stop request is seen within a few
/// milliseconds at the generator's rate.
const GEN_CHUNK: u32 = 1 << 15;

/// A copy of the object loaded in one namespace for its benchmark-only programs; the
/// connection-tracking maps are kept tiny (these programs do not use them).
pub struct Object {
    ns: String,
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
}

impl Object {
    /// Loads the object in namespace `ns`.
    pub fn load(ns: &str) -> Result<Self> {
        let ebpf = in_netns(ns, || {
            let mut loader = EbpfLoader::new();
            for map in [SESSIONS, REPLIES, MAPPINGS, BINDINGS] {
                loader.map_max_entries(map, 1024);
            }
            loader
                .load(EBPF_OBJECT)
                .context("loading the XDP object for its benchmark programs")
        })?;
        Ok(Self {
            ns: ns.to_owned(),
            ebpf,
            links: Vec::new(),
        })
    }

    fn program_mut(&mut self, name: &str) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name}: program type"))?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("the kernel verifier rejected {name}"))?;
        }
        Ok(program)
    }

    fn program(&self, name: &str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .ok_or_else(|| anyhow!("the object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name}: program type"))
    }

    /// Attaches program `name` to `dev` in driver mode (what gives a veth NAPI for XDP).
    pub fn attach(&mut self, name: &str, dev: &str) -> Result<()> {
        let ns = self.ns.clone();
        let program = self.program_mut(name)?;
        let id = in_netns(&ns, || {
            program
                .attach(dev, XdpMode::Driver)
                .with_context(|| format!("attaching {name} to {dev}"))
        })?;
        self.links.push((name.to_owned(), id));
        Ok(())
    }

    /// Detaches everything this object attached.
    pub fn detach_all(&mut self) -> Result<()> {
        let links: Vec<_> = self.links.drain(..).collect();
        for (name, id) in links {
            self.program_mut(&name)?
                .detach(id)
                .with_context(|| format!("detaching {name}"))?;
        }
        Ok(())
    }
}

/// The generator: an [`Object`] in the generator's namespace with `xdp_bench_gen` attached to
/// an idle interface for the whole run (a live-frames run of a program that is attached
/// nowhere waits for an RCU grace period on every call, BENCHMARKING.md).
pub struct Generator {
    obj: Object,
    /// The interface frames leave by (XDP_TX out of the run's ingress interface).
    ifindex: u32,
}

impl Generator {
    /// Loads the generator in `ns`, attached to `idle_dev`, sending out of `ifindex`.
    pub fn new(ns: &str, idle_dev: &str, ifindex: u32) -> Result<Self> {
        let mut obj = Object::load(ns)?;
        obj.attach(XDP_BENCH_GEN_PROGRAM, idle_dev)?;
        Ok(Self { obj, ifindex })
    }

    /// Makes `cfg` what the following runs send.
    pub fn configure(&mut self, cfg: &GenConfig) -> Result<()> {
        let map = self
            .obj
            .ebpf
            .map_mut(BENCH_GEN)
            .ok_or_else(|| anyhow!("the object has no map {BENCH_GEN}"))?;
        let mut array: Array<_, GenConfig> = Array::try_from(map)?;
        array
            .set(0, cfg, 0)
            .context("writing the generator config")?;
        Ok(())
    }

    /// Frames built so far, all CPUs.
    pub fn sent(&self) -> Result<u64> {
        let map = self
            .obj
            .ebpf
            .map(BENCH_GEN_SEQ)
            .ok_or_else(|| anyhow!("the object has no map {BENCH_GEN_SEQ}"))?;
        let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let values: PerCpuValues<u64> = array.get(&0, 0)?;
        Ok(values.iter().sum())
    }

    /// Sends until `stop` is set, `deadline` passes or `max_frames` are sent (whichever comes
    /// first), from the calling thread, which must be in the generator's namespace and on the
    /// generator's CPU. Returns the frames sent.
    pub fn run(
        &self,
        frame: &[u8],
        stop: &AtomicBool,
        deadline: Instant,
        max_frames: u64,
    ) -> Result<u64> {
        let program = self.obj.program(XDP_BENCH_GEN_PROGRAM)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. Live frames want data_end to be the frame's length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < max_frames {
            let repeat = GEN_CHUNK.min((max_frames - sent) as u32);
            program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat,
                    attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
                    ..TestRunOptions::new()
                })
                .context("the kernel refused a live-frames run of the generator")?;
            sent += u64::from(repeat);
        }
        Ok(sent)
    }
}

/// The appliance: the real object loaded and filled through the agent's own config, compile
/// and dataplane path, attached to the appliance's interfaces while its configuration is
/// measured and detached otherwise.
pub struct Appliance {
    ns: String,
    dp: Dataplane,
    interfaces: Vec<Interface>,
    /// Follows routing changes for the route cache, as `nat-agent run` does (held for its
    /// lifetime; `None` where nothing forwards from XDP).
    _route_watch: Option<RouteWatch>,
}

impl Appliance {
    /// Loads `config` (TOML as `nat-agent run` reads it) in namespace `ns`, not attached.
    pub fn load(ns: &str, what: &str, config: &str) -> Result<Self> {
        let Loaded {
            model, compiled, ..
        } = load_config_text(&format!("bench topology {what} config"), config)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("bench bug: the {what} config is not valid"))?;
        let max_sessions = model.conntrack.max_sessions;
        let dp = in_netns(ns, || {
            let mut dp = Dataplane::load_with(&LoadOptions {
                max_sessions,
                ..Default::default()
            })
            .with_context(|| format!("loading the XDP object ({what})"))?;
            dp.apply(&compiled)
                .with_context(|| format!("writing the {what} rules"))?;
            // As deployed: the agent turns the route cache on where XDP forwards. Started here,
            // so its netlink socket listens in the appliance's namespace; a failure fails the
            // run rather than measure something else than what runs.
            let watch = RouteWatch::for_config(&model, &dp).context("starting the route cache")?;
            Ok((dp, watch))
        })?;
        let (dp, route_watch) = dp;
        Ok(Self {
            ns: ns.to_owned(),
            dp,
            interfaces: model.interfaces,
            _route_watch: route_watch,
        })
    }

    /// Attaches to the configured interfaces.
    pub fn attach(&mut self) -> Result<()> {
        let (dp, interfaces) = (&mut self.dp, &self.interfaces);
        in_netns(&self.ns, || dp.attach_all(interfaces))
    }

    /// Detaches from every interface.
    pub fn detach(&mut self) -> Result<()> {
        let dp = &mut self.dp;
        in_netns(&self.ns, || {
            dp.detach_all();
            Ok(())
        })
    }

    /// Packets per exit reason so far (index: `Reason as usize`).
    pub fn reasons(&self) -> Result<Vec<u64>> {
        Ok(self.dp.snapshot(std::iter::empty())?.reasons)
    }

    /// Forwarding results so far (index: `ForwardResult as usize`).
    pub fn forward_results(&self) -> Result<Vec<u64>> {
        Ok(self.dp.snapshot(std::iter::empty())?.forward)
    }

    /// The external endpoint the appliance maps `inside` to, if it holds a mapping for it.
    pub fn external_of(&mut self, inside: &Endpoint) -> Result<Option<Endpoint>> {
        let store = self
            .dp
            .sessions()
            .ok_or_else(|| anyhow!("the appliance's object has no connection tracking"))?;
        Ok(store.mappings().get(inside)?.map(|m| m.external))
    }

    /// Route-cache outcomes so far (index: `RouteCacheResult as usize`).
    pub fn route_cache_results(&self) -> Result<Vec<u64>> {
        Ok(self.dp.snapshot(std::iter::empty())?.route_cache)
    }

    /// Empties the four connection-tracking tables and frees their ports in the free-port
    /// index (between new-flow measurements, so each starts from the same table).
    pub fn clear_sessions(&mut self) -> Result<u64> {
        let ids = self
            .dp
            .loaded_program(nat_common::maps::XDP_NEW_FLOW_PROGRAM)?
            .info()?
            .map_ids()?
            .ok_or_else(|| anyhow!("the kernel did not list the new-flow program's maps"))?;
        let maps = crate::bench_fill::ConntrackMaps::open(&ids)?;
        let mut sessions = 0;
        sessions += drain(&maps.sessions, SESSIONS, |key: &FlowKey| {
            maps.filter.uncount(key, Counted::Sessions)
        })?;
        drain(&maps.replies, REPLIES, |key: &FlowKey| {
            maps.filter.uncount(key, Counted::Replies)
        })?;
        drain::<Endpoint>(&maps.mappings, MAPPINGS, |_| {})?;
        // Each port claimed goes back to the free-port index too, as the agent's deletions
        // do: a run of a million new flows marks a quarter of the pool's ports, and runs
        // after runs would otherwise find the index full.
        let index = self.dp.sessions().and_then(|store| store.ports());
        drain::<Endpoint>(&maps.bindings, BINDINGS, |external| {
            if let Some(index) = index {
                index.release(external);
            }
        })?;
        Ok(sessions)
    }
}

/// Deletes every key of a hash map: all keys first (no deletes while walking), then batch
/// deletes, each deleted key then handed to `deleted`. Returns how many there were.
fn drain<K: aya::Pod>(map: &aya::maps::MapData, name: &str, deleted: impl Fn(&K)) -> Result<u64> {
    use std::os::fd::AsFd;
    let fd = map.fd().as_fd();
    let mut keys: Vec<K> = Vec::new();
    let mut key: Option<K> = None;
    while let Some(next) =
        crate::bench_sys::next_key(fd, key.as_ref()).with_context(|| format!("walking {name}"))?
    {
        keys.push(next);
        key = Some(next);
    }
    for chunk in keys.chunks(8192) {
        crate::bench_sys::delete_batch(fd, chunk).with_context(|| format!("emptying {name}"))?;
        chunk.iter().for_each(&deleted);
    }
    Ok(keys.len() as u64)
}

/// Waits a moment for attach and detach to settle (a veth's NAPI reconfiguration takes effect
/// asynchronously).
pub fn settle() {
    std::thread::sleep(Duration::from_millis(20));
}
