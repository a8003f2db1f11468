//! `fixtures_not_ours` run through the TC twin of the NAT program (`tc_nat`, on socket buffers)
//! instead of `xdp_nat`: the same frames and expectations (see `common/xdp.rs`, `Hook`).

#[path = "fixtures_not_ours.rs"]
mod fixtures;
