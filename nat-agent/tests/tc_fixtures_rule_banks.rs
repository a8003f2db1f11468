//! `fixtures_rule_banks` run through the TC twin of the NAT program (`tc_nat`, on socket buffers)
//! instead of `xdp_nat`: the same frames and expectations (see `common/xdp.rs`, `Hook`).

#[path = "fixtures_rule_banks.rs"]
mod fixtures;
