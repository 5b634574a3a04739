//! A node of the lab: a network namespace of its own, linked to the lab bridge, routing for
//! the pods whose host-side veths it holds. What runs on a node (a node exporter) runs in it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Output;

use anyhow::Result;

use crate::attach::{self, Attachments};
use crate::cmd;
use crate::pod::Background;

/// A node: namespace `lmnode-<lab id>-<name>` whose `eth0` is a veth to the lab bridge
/// (`10.x.y.N/24`, `fd00:6c6d:xxyy::N/64`), with forwarding on and a route to every pod of
/// the lab's other nodes via that node's address.
///
/// Its pods ([`Lab::add_pod_on`](crate::Lab::add_pod_on)) have their host-side veth in this
/// namespace and reach the rest of the lab through it: pod to pod on one node is routed by
/// the node, pod to pod across nodes by both nodes over the bridge. Plain data like
/// [`Pod`](crate::Pod); the [`Lab`](crate::Lab) owns the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// `lmnode-<lab id>-<name>`.
    pub netns: String,
    /// The root-namespace end of the node's link: `lmh<lab id><N>`, a port of the lab bridge
    /// (the node's end is `eth0`).
    pub uplink: String,
    /// `10.x.y.N` on the node's `eth0`; also its pods' IPv4 gateway.
    pub ipv4: Ipv4Addr,
    /// `fd00:6c6d:xxyy::N` on the node's `eth0`.
    pub ipv6: Ipv6Addr,
}

impl Node {
    /// Runs `argv` in the node's namespace to completion (any exit status).
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        cmd::run(&cmd::in_netns(&self.netns, argv))
    }

    /// Runs `argv` in the node's namespace; fails unless it exits 0; returns its stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        cmd::run_ok(&cmd::in_netns(&self.netns, argv))
    }

    /// Starts `argv` in the node's namespace in the background (`ip netns exec`, which execs
    /// it: [`Background::pid`] is the program's own pid). The guard kills it when dropped.
    pub fn spawn(&self, argv: &[&str]) -> Result<Background> {
        Background::start(&cmd::in_netns(&self.netns, argv), None)
    }

    /// `ipv4:port`: where a server listening on the node's address is reached from the root
    /// namespace and from every other node and pod.
    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ipv4, port))
    }

    /// BPF attachments on `iface`, an interface in the node's namespace.
    pub fn attachments(&self, iface: &str) -> Result<Attachments> {
        attach::attachments_in(&self.netns, iface)
    }
}
