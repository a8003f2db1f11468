//! Attaching the program to interfaces, and detaching it: `xdp_nat` through XDP links, or
//! `tc_nat` at TC ingress through TCX links (`hook = "tc"`). Through links the agent owns,
//! or, with pinned state, through links pinned in bpffs that keep the program attached when
//! the agent stops and into which a new agent swaps its program atomically.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap as AyaHashMap, MapData},
    programs::{
        links::{FdLink, LinkType, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
    },
};
use nat_common::maps::{
    FORWARD_XDP, IFACE_FLAGS, IFACE_FLAG_SLOTS, IFACE_FORWARD, IFACE_KNOWN, TC_PROGRAM, XDP_PROGRAM,
};
use tracing::{info, warn};

use super::{is_absent_key, pinned, xdp_query, Dataplane};
use crate::model::{Forwarding, Hook, Interface, XdpMode};

/// A link kept by the program that made or took it over.
#[derive(Debug)]
pub(super) enum LinkId {
    /// Of `xdp_nat`.
    Xdp(XdpLinkId),
    /// Of `tc_nat` (a TCX link).
    Tc(SchedClassifierLinkId),
}

/// How the program is attached to one interface.
pub(super) enum Link {
    /// A link this agent owns: detaching (or stopping) ends it.
    Owned(LinkId),
    /// A link pinned in bpffs by this agent: it outlives the agent.
    Pinned(PinnedLink),
    /// A pinned link of an earlier run, now running this agent's program (owned through the
    /// program, but its pin keeps it alive when the agent stops).
    Adopted(LinkId),
}

/// One attachment.
pub(super) struct Attachment {
    pub(super) interface: String,
    /// The hook, with the XDP mode it runs in (for a link taken over, as the kernel reports it).
    pub(super) hook: Hook,
    pub(super) link: Link,
}

impl Dataplane {
    /// Attaches to every interface, honouring each one's hook and mode; with pinned state,
    /// swaps this program into the links of an earlier run instead (atomically: no packet goes
    /// untranslated; a link of the other hook is replaced, with a gap: see `take_over`) and
    /// detaches interfaces that left the config. On failure, what this call attached afresh is
    /// detached again so nothing is left half done.
    pub fn attach_all(&mut self, interfaces: &[Interface]) -> Result<()> {
        // Before anything is touched: a hook this object cannot serve must not cost an
        // interface the link of an earlier run.
        self.check_hooks(interfaces)?;
        for iface in interfaces {
            if let Err(e) = self.attach(iface) {
                self.undo_fresh_attachments();
                return Err(e);
            }
        }
        if let Some(state) = self.state.clone() {
            for (name, path) in state.pinned_links()? {
                if !interfaces.iter().any(|i| i.name == name) {
                    pinned::unpin_link(&path)?;
                    info!(interface = %name, "interface left the config: program detached");
                }
            }
            let keep: Vec<&Path> = self.programs_pins.iter().map(|p| p.as_path()).collect();
            for stale in state.other_programs(&keep)? {
                std::fs::remove_file(&stale)
                    .with_context(|| format!("removing {}", stale.display()))?;
            }
        }
        Ok(())
    }

    /// Loads each hook's programs an interface asks for and that are not loaded yet; refuses
    /// the config when the object has none for a hook (or the verifier rejects one).
    fn check_hooks(&mut self, interfaces: &[Interface]) -> Result<()> {
        if let Some(iface) = interfaces.iter().find(|i| matches!(i.hook, Hook::Xdp(_))) {
            self.load_xdp()
                .with_context(|| format!("interface {} has hook = \"xdp\"", iface.name))?;
        }
        if let Some(iface) = interfaces.iter().find(|i| i.hook == Hook::Tc) {
            self.load_tc()
                .with_context(|| format!("interface {} has hook = \"tc\"", iface.name))?;
        }
        Ok(())
    }

    fn xdp_program(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("the object has no program {XDP_PROGRAM}"))?
            .try_into()
            .context("program type")
    }

    /// `tc_nat`; `check_hooks` has loaded it (or refused the config: the operator's message
    /// for an object without it is `Dataplane::load_tc`'s).
    fn tc_program(&mut self) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| anyhow!("the object has no program {TC_PROGRAM}"))?
            .try_into()
            .context("program type")
    }

    fn attach(&mut self, iface: &Interface) -> Result<()> {
        let pin = self.state.as_ref().map(|s| s.link_path(&iface.name));
        if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
            match self.take_over(iface, path) {
                Ok(true) => return self.set_forwarding(iface),
                // The hook changed: the old link is gone.
                Ok(false) => {}
                Err(e) => {
                    // The interface may have been deleted and created again: its old link is
                    // dead. Drop it and attach afresh.
                    warn!(interface = %iface.name, error = %format!("{e:#}"), "cannot take over the pinned link; attaching afresh");
                    pinned::unpin_link(path)?;
                }
            }
        }
        let (id, hook) = self.attach_new(iface)?;
        let link = match pin {
            Some(path) => Link::Pinned(
                self.take_fd_link(id)?
                    .pin(&path)
                    .with_context(|| format!("pinning the link at {}", path.display()))?,
            ),
            None => Link::Owned(id),
        };
        info!(interface = %iface.name, hook = hook.name(), mode = hook.mode(), forwarding = iface.forwarding.as_str(), pinned = matches!(link, Link::Pinned(_)), "program attached");
        self.attached.push(Attachment {
            interface: iface.name.clone(),
            hook,
            link,
        });
        self.set_forwarding(iface)
    }

    /// Takes over the link an earlier run pinned at `path` for `iface`. Of the hook `iface`
    /// asks for, this program is swapped into it (`Ok(true)`). Of the other hook (the config
    /// changed `hook`), it is unpinned, which detaches it, and the caller attaches afresh
    /// (`Ok(false)`): the two hooks cannot hand over atomically, and both at once would
    /// translate twice.
    fn take_over(&mut self, iface: &Interface, path: &Path) -> Result<bool> {
        let pinned =
            PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
        let link = FdLink::from(pinned);
        let pinned_hook = link_hook(&link).with_context(|| path.display().to_string())?;
        if pinned_hook != iface.hook.name() {
            drop(link);
            pinned::unpin_link(path)?;
            info!(interface = %iface.name, from = pinned_hook, to = iface.hook.name(), "hook changed: the pinned link of the last run is detached; this interface is not translated until the new hook is attached (a brief gap)");
            return Ok(false);
        }
        let hook = match iface.hook {
            Hook::Xdp(wanted) => {
                let actual = pinned_xdp_mode(&iface.name)?;
                if wanted != XdpMode::Auto && actual != wanted {
                    drop(link);
                    pinned::unpin_link(path)?;
                    info!(interface = %iface.name, from = actual.as_str(), to = wanted.as_str(), "xdp_mode changed: the pinned link of the last run is detached; this interface is not translated until it is attached in the new mode (a brief gap)");
                    return Ok(false);
                }
                // `auto` takes either mode over as it is: re-attaching only to try native
                // again would cost a gap, and could fall back to generic all the same.
                Hook::Xdp(actual)
            }
            Hook::Tc => Hook::Tc,
        };
        self.adopt(iface, hook, link)?;
        Ok(true)
    }

    /// Swaps this agent's program of `hook` into `link`, a link of that hook attached to
    /// `iface` (in `hook`'s XDP mode, which status and metrics then report).
    fn adopt(&mut self, iface: &Interface, hook: Hook, link: FdLink) -> Result<()> {
        let id = match hook {
            Hook::Xdp(_) => {
                let link = XdpLink::try_from(link).context("not an XDP link")?;
                LinkId::Xdp(
                    self.xdp_program()?
                        .attach_to_link(link)
                        .context("bpf_link_update")?,
                )
            }
            Hook::Tc => {
                let link = SchedClassifierLink::try_from(link).context("not a TCX link")?;
                LinkId::Tc(
                    self.tc_program()?
                        .attach_to_link(link)
                        .context("bpf_link_update")?,
                )
            }
        };
        info!(interface = %iface.name, hook = hook.name(), mode = hook.mode(), "program replaced in the pinned link (atomically)");
        self.attached.push(Attachment {
            interface: iface.name.clone(),
            hook,
            link: Link::Adopted(id),
        });
        Ok(())
    }

    /// Attaches afresh; returns the link and the hook with the XDP mode it got.
    fn attach_new(&mut self, iface: &Interface) -> Result<(LinkId, Hook)> {
        Ok(match iface.hook {
            Hook::Xdp(mode) => {
                let (id, mode) = self.attach_xdp(&iface.name, mode)?;
                (LinkId::Xdp(id), Hook::Xdp(mode))
            }
            Hook::Tc => (LinkId::Tc(self.attach_tc(&iface.name)?), Hook::Tc),
        })
    }

    /// Attaches `tc_nat` at `interface`'s TC ingress through a TCX link, after any TCX
    /// programs already there. Always TCX, never the netlink `cls_bpf` filter older kernels
    /// would need: only a bpf_link can be pinned and have its program swapped atomically.
    fn attach_tc(&mut self, interface: &str) -> Result<SchedClassifierLinkId> {
        self.tc_program()?
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| {
                format!(
                    "attaching {TC_PROGRAM} to {interface} at TC ingress (a TCX link, which \
                     needs Linux 6.6 or later)"
                )
            })
    }

    fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<(XdpLinkId, XdpMode)> {
        let program = self.xdp_program()?;
        Ok(match mode {
            XdpMode::Native => (
                program
                    .attach(interface, AyaXdpMode::Driver)
                    .with_context(|| format!("attaching to {interface} in native mode"))?,
                XdpMode::Native,
            ),
            XdpMode::Generic => (
                program
                    .attach(interface, AyaXdpMode::Skb)
                    .with_context(|| format!("attaching to {interface} in generic mode"))?,
                XdpMode::Generic,
            ),
            XdpMode::Auto => match program.attach(interface, AyaXdpMode::Driver) {
                Ok(link) => (link, XdpMode::Native),
                Err(native_err) => {
                    warn!(interface = %interface, error = %native_err, "native XDP refused; falling back to generic mode");
                    let link = program
                        .attach(interface, AyaXdpMode::Skb)
                        .with_context(|| {
                            format!("attaching to {interface} (native: {native_err}; generic)")
                        })?;
                    (link, XdpMode::Generic)
                }
            },
        })
    }

    /// Detaches link `id` (one this agent owns).
    fn detach_link(&mut self, id: LinkId) -> Result<()> {
        match id {
            LinkId::Xdp(id) => self.xdp_program()?.detach(id)?,
            LinkId::Tc(id) => self.tc_program()?.detach(id)?,
        }
        Ok(())
    }

    /// Takes link `id` out of its program's keeping as an fd link: pinned, it outlives the
    /// agent; dropped, only the agent's handle closes (a link still pinned stays attached).
    fn take_fd_link(&mut self, id: LinkId) -> Result<FdLink> {
        match id {
            LinkId::Xdp(id) => {
                let link = self
                    .xdp_program()?
                    .take_link(id)
                    .context("taking the XDP link")?;
                FdLink::try_from(link).context("the XDP link is not a bpf_link")
            }
            LinkId::Tc(id) => {
                let link = self
                    .tc_program()?
                    .take_link(id)
                    .context("taking the TC link")?;
                FdLink::try_from(link).context("the TC link is not a bpf_link")
            }
        }
    }

    /// Tells the program who forwards translated packets arriving on `iface`: in the pinned
    /// `IFACE_FORWARD`, and in this program generation's fast copy `IFACE_FLAGS` where the
    /// interface index fits it. The same for both hooks: `FORWARD_XDP` means "the program
    /// forwards" (XDP redirect, or `bpf_redirect` from TC).
    fn set_forwarding(&mut self, iface: &Interface) -> Result<()> {
        let ifindex = super::ifindex(&iface.name)?;
        let map = self
            .ebpf
            .map_mut(IFACE_FORWARD)
            .ok_or_else(|| anyhow!("missing map {IFACE_FORWARD}"))?;
        let mut table: AyaHashMap<&mut MapData, u32, u32> =
            AyaHashMap::try_from(map).context("opening the interface table")?;
        match iface.forwarding {
            Forwarding::Xdp => table
                .insert(ifindex, FORWARD_XDP, 0)
                .with_context(|| format!("enabling XDP forwarding on {}", iface.name))?,
            // Absent means "the kernel forwards"; a stale entry from a reused index must go.
            Forwarding::Kernel => match table.remove(&ifindex) {
                Ok(()) => {}
                Err(e) if is_absent_key(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("clearing forwarding on {}", iface.name))
                }
            },
        }
        if ifindex >= IFACE_FLAG_SLOTS {
            // The program asks IFACE_FORWARD for this one.
            return Ok(());
        }
        let Some(map) = self.ebpf.map_mut(IFACE_FLAGS) else {
            return Ok(());
        };
        let mut flags: Array<&mut MapData, u32> =
            Array::try_from(map).with_context(|| format!("opening {IFACE_FLAGS}"))?;
        let value = match iface.forwarding {
            Forwarding::Xdp => IFACE_KNOWN | FORWARD_XDP,
            Forwarding::Kernel => IFACE_KNOWN,
        };
        flags
            .set(ifindex, value, 0)
            .with_context(|| format!("writing {IFACE_FLAGS} for {}", iface.name))
    }

    /// Interfaces attached and the hook and XDP mode each one runs in (for a link taken over
    /// from an earlier run, the mode the kernel reports).
    pub fn attachments(&self) -> impl Iterator<Item = (&str, Hook)> {
        self.attached.iter().map(|a| (a.interface.as_str(), a.hook))
    }

    /// Lets go of every attachment. Links this agent owns end, so the program is detached;
    /// pinned links stay and keep translating (detach those with `nat-agent state detach`).
    pub fn detach_all(&mut self) {
        let attached: Vec<Attachment> = self.attached.drain(..).collect();
        for a in attached {
            let hook = a.hook.name();
            match a.link {
                Link::Owned(id) => match self.detach_link(id) {
                    Ok(()) => info!(interface = %a.interface, hook, "program detached"),
                    Err(e) => {
                        warn!(interface = %a.interface, hook, error = %format!("{e:#}"), "detaching failed")
                    }
                },
                Link::Pinned(link) => {
                    drop(link);
                    info!(interface = %a.interface, hook, "program left attached (pinned link)");
                }
                Link::Adopted(id) => {
                    // Closing the agent's handle; the pin keeps the link and the program.
                    let _ = self.take_fd_link(id);
                    info!(interface = %a.interface, hook, "program left attached (pinned link)");
                }
            }
        }
    }

    /// After a failed `attach_all`: detach what it attached afresh (pinned links included,
    /// which would otherwise outlive a start that never completed). Links taken over from an
    /// earlier run stay, now running this program.
    fn undo_fresh_attachments(&mut self) {
        let attached: Vec<Attachment> = self.attached.drain(..).collect();
        for a in attached {
            match a.link {
                Link::Owned(id) => {
                    let _ = self.detach_link(id);
                }
                Link::Pinned(link) => {
                    if let Err(e) = link.unpin() {
                        warn!(interface = %a.interface, error = %e, "unpinning a link of a failed start");
                    }
                }
                Link::Adopted(id) => {
                    let _ = self.take_fd_link(id);
                }
            }
        }
    }
}

/// The hook (config spelling) of a link found pinned.
fn link_hook(link: &FdLink) -> Result<&'static str> {
    let kind = link
        .info()
        .and_then(|info| info.link_type())
        .context("reading the link's type")?;
    match kind {
        LinkType::Xdp => Ok("xdp"),
        LinkType::Tcx => Ok("tc"),
        other => bail!("a {other:?} link, neither XDP nor TCX"),
    }
}

/// The mode the XDP link pinned for `interface` runs in. An error when the interface has no
/// XDP program: the pinned link is dead (the interface was deleted and created again), and the
/// caller attaches afresh.
fn pinned_xdp_mode(interface: &str) -> Result<XdpMode> {
    let ifindex = super::ifindex(interface)?;
    xdp_query::attached_mode(ifindex)?
        .with_context(|| format!("{interface} has no XDP program, although its link is pinned"))
}
