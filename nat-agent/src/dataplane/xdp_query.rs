//! The mode an XDP program runs in on an interface, as the kernel reports it: the
//! `IFLA_XDP_ATTACHED` attribute of the interface's `RTM_GETLINK` answer.
//!
//! Why ask: an XDP bpf_link tells its interface but not its mode, and a link pinned by an
//! earlier run may have been attached in another mode than the config now asks for (the
//! operator changed `xdp_mode`, or `auto` fell back to generic). Taking it over blindly would
//! leave the interface in the old mode and report the configured one.

use anyhow::{bail, Context, Result};
use rtnetlink::{
    packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST},
    packet_route::{
        link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
        RouteNetlinkMessage,
    },
    sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
};

use crate::model::XdpMode;

/// Room for one `RTM_NEWLINK` answer (an interface's attributes are a few KiB at most; the
/// kernel truncates to the buffer and says so, which is reported as an error).
const ANSWER_BUFFER: usize = 64 << 10;

/// The mode of the XDP program attached to interface `ifindex`: `Some(Native)` for driver
/// mode, `Some(Generic)` for skb mode, `None` when no XDP program is attached. Offloaded or
/// several programs at once (which this agent never attaches) are errors: the caller cannot
/// take such an attachment over.
pub(super) fn attached_mode(ifindex: u32) -> Result<Option<XdpMode>> {
    let link = get_link(ifindex).with_context(|| {
        format!("asking the kernel (RTM_GETLINK) for the XDP mode of interface {ifindex}")
    })?;
    mode_of(&link).with_context(|| format!("the XDP attachment of interface {ifindex}"))
}

/// The XDP mode the attributes of `link` report (see [`attached_mode`]).
fn mode_of(link: &LinkMessage) -> Result<Option<XdpMode>> {
    let attached = link
        .attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })
        .flatten()
        .find_map(|x| match x {
            LinkXdp::Attached(attached) => Some(attached),
            _ => None,
        });
    Ok(match attached {
        None | Some(XdpAttached::None) => None,
        Some(XdpAttached::Driver) => Some(XdpMode::Native),
        Some(XdpAttached::SocketBuffer) => Some(XdpMode::Generic),
        Some(other) => bail!("attached as {other:?}, a mode this agent does not attach in"),
    })
}

/// One `RTM_GETLINK` request for `ifindex` and its answer, over a socket of its own.
fn get_link(ifindex: u32) -> Result<LinkMessage> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a route netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the netlink socket to the kernel")?;

    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(request)),
    );
    message.finalize();
    let mut bytes = vec![0; message.header.length as usize];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0).context("sending RTM_GETLINK")?;

    let mut answer = vec![0u8; ANSWER_BUFFER];
    let received = socket
        .recv(&mut &mut answer[..], libc::MSG_TRUNC)
        .context("receiving the answer")?;
    if received > answer.len() {
        bail!("the answer ({received} bytes) does not fit {ANSWER_BUFFER} bytes");
    }
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..received])
        .context("decoding the answer")?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => Ok(link),
        NetlinkPayload::Error(error) => Err(error.to_io()).context("the kernel refused"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_with(xdp: Vec<LinkXdp>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::Mtu(1500));
        link.attributes.push(LinkAttribute::Xdp(xdp));
        link
    }

    #[test]
    fn modes_map_to_the_config_spelling() {
        let mode = |a| mode_of(&link_with(vec![LinkXdp::Attached(a)])).unwrap();
        assert_eq!(mode(XdpAttached::Driver), Some(XdpMode::Native));
        assert_eq!(mode(XdpAttached::SocketBuffer), Some(XdpMode::Generic));
        assert_eq!(mode(XdpAttached::None), None);
        assert!(mode_of(&link_with(vec![LinkXdp::Attached(XdpAttached::Hardware)])).is_err());
        assert!(mode_of(&link_with(vec![LinkXdp::Attached(XdpAttached::Multiple)])).is_err());
    }

    #[test]
    fn no_xdp_attribute_means_nothing_attached() {
        assert_eq!(mode_of(&LinkMessage::default()).unwrap(), None);
        assert_eq!(mode_of(&link_with(vec![LinkXdp::ProgId(7)])).unwrap(), None);
    }

    /// The loopback interface (index 1 in every namespace) has no XDP program: the real
    /// kernel answer parses and says so.
    #[test]
    fn the_kernel_answers_for_loopback() {
        assert_eq!(attached_mode(1).unwrap(), None);
    }

    #[test]
    fn a_missing_interface_is_an_error_that_names_it() {
        let e = attached_mode(u32::MAX - 1).unwrap_err();
        assert!(
            format!("{e:#}").contains(&(u32::MAX - 1).to_string()),
            "{e:#}"
        );
    }
}
