//! `fixtures_mutations` run through the TC twin of the NAT program (`tc_nat`, on socket
//! buffers) instead of `xdp_nat`: the same mangled frames and rules (see `common/xdp.rs`,
//! `Hook`).

#[path = "fixtures_mutations.rs"]
mod fixtures;
