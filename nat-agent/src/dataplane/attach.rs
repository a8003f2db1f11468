//! Attaching the program to interfaces, and detaching it: through links the agent owns, or,
//! with pinned state, through links pinned in bpffs that keep the program attached when the
//! agent stops and into which a new agent swaps its program atomically.

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, HashMap as AyaHashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode as AyaXdpMode,
    },
};
use nat_common::maps::{
    FORWARD_XDP, IFACE_FLAGS, IFACE_FLAG_SLOTS, IFACE_FORWARD, IFACE_KNOWN, XDP_PROGRAM,
};
use tracing::{info, warn};

use super::{is_absent_key, pinned, Dataplane};
use crate::model::{Forwarding, Interface, XdpMode};

/// How the program is attached to one interface.
pub(super) enum Link {
    /// A link this agent owns: detaching (or stopping) ends it.
    Owned(XdpLinkId),
    /// A link pinned in bpffs by this agent: it outlives the agent.
    Pinned(PinnedLink),
    /// A pinned link of an earlier run, now running this agent's program (owned through the
    /// program, but its pin keeps it alive when the agent stops).
    Adopted(XdpLinkId),
}

/// One attachment.
pub(super) struct Attachment {
    pub(super) interface: String,
    pub(super) mode: XdpMode,
    pub(super) link: Link,
}

impl Dataplane {
    /// Attaches to every interface, honouring each one's mode; with pinned state, swaps this
    /// program into the links of an earlier run instead (atomically: no packet goes
    /// untranslated) and detaches interfaces that left the config. On failure, what this call
    /// attached afresh is detached again so nothing is left half done.
    pub fn attach_all(&mut self, interfaces: &[Interface]) -> Result<()> {
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
                    info!(interface = %name, "interface left the config: XDP program detached");
                }
            }
            if let Some(keep) = &self.programs_pin {
                for stale in state.other_programs(keep)? {
                    std::fs::remove_file(&stale)
                        .with_context(|| format!("removing {}", stale.display()))?;
                }
            }
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

    fn attach(&mut self, iface: &Interface) -> Result<()> {
        let pin = self.state.as_ref().map(|s| s.link_path(&iface.name));
        if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
            match self.adopt(iface, path) {
                Ok(()) => return self.set_forwarding(iface),
                Err(e) => {
                    // The interface may have been deleted and created again: its old link is
                    // dead. Drop it and attach afresh.
                    warn!(interface = %iface.name, error = %format!("{e:#}"), "cannot take over the pinned link; attaching afresh");
                    pinned::unpin_link(path)?;
                }
            }
        }
        let (id, mode) = self.attach_new(iface)?;
        let link = match pin {
            Some(path) => {
                let owned = self
                    .xdp_program()?
                    .take_link(id)
                    .context("taking the new link")?;
                let fd = FdLink::try_from(owned).context("the XDP link is not a bpf_link")?;
                Link::Pinned(
                    fd.pin(&path)
                        .with_context(|| format!("pinning the link at {}", path.display()))?,
                )
            }
            None => Link::Owned(id),
        };
        info!(interface = %iface.name, mode = mode.as_str(), forwarding = iface.forwarding.as_str(), pinned = matches!(link, Link::Pinned(_)), "XDP program attached");
        self.attached.push(Attachment {
            interface: iface.name.clone(),
            mode,
            link,
        });
        self.set_forwarding(iface)
    }

    /// Swaps this program into the pinned link at `path`.
    fn adopt(&mut self, iface: &Interface, path: &std::path::Path) -> Result<()> {
        let pinned =
            PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).context("not an XDP link")?;
        let id = self
            .xdp_program()?
            .attach_to_link(link)
            .context("bpf_link_update")?;
        info!(interface = %iface.name, "XDP program replaced in the pinned link (atomically)");
        self.attached.push(Attachment {
            interface: iface.name.clone(),
            mode: iface.mode,
            link: Link::Adopted(id),
        });
        Ok(())
    }

    fn attach_new(&mut self, iface: &Interface) -> Result<(XdpLinkId, XdpMode)> {
        let program = self.xdp_program()?;
        Ok(match iface.mode {
            XdpMode::Native => (
                program
                    .attach(&iface.name, AyaXdpMode::Driver)
                    .with_context(|| format!("attaching to {} in native mode", iface.name))?,
                XdpMode::Native,
            ),
            XdpMode::Generic => (
                program
                    .attach(&iface.name, AyaXdpMode::Skb)
                    .with_context(|| format!("attaching to {} in generic mode", iface.name))?,
                XdpMode::Generic,
            ),
            XdpMode::Auto => match program.attach(&iface.name, AyaXdpMode::Driver) {
                Ok(link) => (link, XdpMode::Native),
                Err(native_err) => {
                    warn!(interface = %iface.name, error = %native_err, "native XDP refused; falling back to generic mode");
                    let link = program
                        .attach(&iface.name, AyaXdpMode::Skb)
                        .with_context(|| {
                            format!(
                                "attaching to {} (native: {native_err}; generic)",
                                iface.name
                            )
                        })?;
                    (link, XdpMode::Generic)
                }
            },
        })
    }

    /// Tells the program who forwards translated packets arriving on `iface`: in the pinned
    /// `IFACE_FORWARD`, and in this program generation's fast copy `IFACE_FLAGS` where the
    /// interface index fits it.
    fn set_forwarding(&mut self, iface: &Interface) -> Result<()> {
        let ifindex = crate::sysctl::ifindex(&iface.name)?;
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

    /// Interfaces attached and the mode each one got (for a link taken over from an earlier
    /// run, the configured mode).
    pub fn attachments(&self) -> impl Iterator<Item = (&str, XdpMode)> {
        self.attached.iter().map(|a| (a.interface.as_str(), a.mode))
    }

    /// Lets go of every attachment. Links this agent owns end, so the program is detached;
    /// pinned links stay and keep translating (detach those with `nat-agent state detach`).
    pub fn detach_all(&mut self) {
        let attached: Vec<Attachment> = self.attached.drain(..).collect();
        for a in attached {
            match a.link {
                Link::Owned(id) => match self.xdp_program().and_then(|p| Ok(p.detach(id)?)) {
                    Ok(()) => info!(interface = %a.interface, "XDP program detached"),
                    Err(e) => {
                        warn!(interface = %a.interface, error = %format!("{e:#}"), "detaching failed")
                    }
                },
                Link::Pinned(link) => {
                    drop(link);
                    info!(interface = %a.interface, "XDP program left attached (pinned link)");
                }
                Link::Adopted(id) => {
                    // Closing the agent's handle; the pin keeps the link and the program.
                    let _ = self.xdp_program().map(|p| p.take_link(id));
                    info!(interface = %a.interface, "XDP program left attached (pinned link)");
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
                    let _ = self.xdp_program().map(|p| p.detach(id));
                }
                Link::Pinned(link) => {
                    if let Err(e) = link.unpin() {
                        warn!(interface = %a.interface, error = %e, "unpinning a link of a failed start");
                    }
                }
                Link::Adopted(id) => {
                    let _ = self.xdp_program().map(|p| p.take_link(id));
                }
            }
        }
    }
}
