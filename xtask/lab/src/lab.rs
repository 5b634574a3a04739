//! The lab: a bridge in the root namespace, pods (network namespaces) attached to it by veth
//! pairs, and nodes (network namespaces of their own on the bridge) routing for their pods.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::attach::{self, Attachments};
use crate::cmd;
use crate::names::{self, Subnet};
use crate::netns;
use crate::node::Node;
use crate::pod::Pod;

/// How long a new pod may take until its addresses are usable.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Marks a bridge's `ifalias` as ours; the rest says who owns the lab.
const ALIAS_TAG: &str = "lumen-lab";
/// The IPv6 gateway of a pod on a node: a link-local address on the pod's host-side veth
/// (Linux answers neighbour solicitations only for addresses of the interface asked, and
/// solicits from a link-local one when it forwards).
const NODE_POD_GATEWAY6: &str = "fe80::1";

/// A lab of pods on one bridge, and of nodes on that bridge with pods of their own. Dropping
/// it deletes every namespace and link it created, also while unwinding from a panic;
/// [`Lab::cleanup_stale`] handles processes that died.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let mut lab = lumen_lab::Lab::new("http-flows")?;
/// let server = lab.add_pod("server")?;
/// let client = lab.add_pod("client")?;
/// let _http = server.http_server(8080)?;
/// assert_eq!(client.http_get(server.ipv4.into(), 8080, "/")?, server.http_index_body());
/// # Ok(()) }
/// ```
///
/// Several nodes, pods talking across them:
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let mut lab = lumen_lab::Lab::new("two-nodes")?;
/// let node_a = lab.add_node("node-a")?;
/// lab.add_node("node-b")?;
/// let server = lab.add_pod_on("node-a", "server")?;
/// let client = lab.add_pod_on("node-b", "client")?;
/// let _http = server.http_server(8080)?;
/// // Through node-b, the bridge and node-a; the node's own processes run in its namespace.
/// assert_eq!(client.http_get(server.ipv6.into(), 8080, "/")?, server.http_index_body());
/// let _exporter = node_a.spawn(&["lumen-node-exporter", "--interface", &server.host_if])?;
/// # Ok(()) }
/// ```
pub struct Lab {
    id: String,
    name: String,
    bridge: String,
    bridge_ifindex: u32,
    subnet: Subnet,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    /// Host number of the next pod or node (the bridge is `.1`); never reused, so churn gets
    /// new names.
    next_host: u16,
    keep: bool,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("bridge", &self.bridge)
            .field("ipv4", &self.subnet.ipv4_cidr())
            .field("ipv6", &self.subnet.ipv6_cidr())
            .field("nodes", &self.nodes)
            .field("pods", &self.pods)
            .finish()
    }
}

impl Lab {
    /// Creates the bridge with its addresses. `name` (`[A-Za-z0-9._-]`, up to 48 characters)
    /// only labels the lab in `ip link` output (the bridge's alias) and in [`Lab::list`].
    pub fn new(name: &str) -> Result<Lab> {
        if name.is_empty()
            || name.len() > 48
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            bail!("lab name {name:?} must be 1-48 characters of [A-Za-z0-9._-]");
        }
        let mut last_error = None;
        for _ in 0..8 {
            let id = names::new_id();
            let bridge = names::bridge(&id);
            // Creating the bridge claims the id: `ip link add` fails if it exists.
            let argv = [
                "ip",
                "link",
                "add",
                "name",
                &bridge,
                "type",
                "bridge",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ];
            let out = cmd::run(&argv)?;
            if let Err(e) = cmd::check(&argv, &out) {
                last_error = Some(e);
                continue;
            }
            let mut lab = Lab {
                id,
                name: name.to_owned(),
                bridge,
                bridge_ifindex: 0,
                subnet: Subnet { x: 0, y: 0 },
                pods: Vec::new(),
                nodes: Vec::new(),
                next_host: 2,
                keep: false,
            };
            // From here on `lab`'s Drop removes whatever was made if a step fails.
            lab.set_owner(&Owner::current()?)?;
            // No link-local address on the bridge: fewer RS/MLD frames in captures.
            cmd::run_ok(&[
                "ip",
                "link",
                "set",
                "dev",
                &lab.bridge,
                "addrgenmode",
                "none",
            ])?;
            lab.assign_subnet()?;
            cmd::run_ok(&["ip", "link", "set", "dev", &lab.bridge, "up"])?;
            lab.bridge_ifindex = ifindex(&lab.bridge)?;
            return Ok(lab);
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context("cannot create a lab bridge"))
    }

    /// Picks the first candidate subnet no route or address on this host overlaps, and gives
    /// the bridge `.1` / `::1` in it.
    fn assign_subnet(&mut self) -> Result<()> {
        let mut taken = Vec::new();
        for family in ["-4", "-6"] {
            let text = cmd::run_ok(&["ip", "-o", family, "route", "show", "table", "all"])?;
            taken.extend(text.lines().filter_map(names::route_destination));
        }
        // Broad routes (a VPN's 10.0.0.0/8) are fine: the lab's /24 is more specific and the
        // pods talk over L2 anyway. Anything /16 or narrower (v6: /48) is someone's network.
        taken.retain(|(addr, len)| match addr {
            IpAddr::V4(_) => *len >= 16,
            IpAddr::V6(_) => *len >= 48,
        });
        for attempt in 0..64 {
            let subnet = Subnet::candidate(&self.id, attempt);
            if taken.iter().any(|(a, l)| subnet.overlaps(*a, *l)) {
                continue;
            }
            let v4 = format!("{}/24", subnet.ipv4(1));
            let v6 = format!("{}/64", subnet.ipv6(1));
            cmd::run_ok(&["ip", "addr", "add", &v4, "dev", &self.bridge])?;
            cmd::run_ok(&["ip", "-6", "addr", "add", &v6, "dev", &self.bridge, "nodad"])?;
            // Another lab may have picked the same subnet at the same moment: both see it
            // here, both move on.
            if self.subnet_shared(subnet)? {
                cmd::run_ok(&["ip", "addr", "del", &v4, "dev", &self.bridge])?;
                cmd::run_ok(&["ip", "-6", "addr", "del", &v6, "dev", &self.bridge])?;
                continue;
            }
            self.subnet = subnet;
            return Ok(());
        }
        bail!("no free 10.200-249.x.0/24 subnet found after 64 attempts")
    }

    /// Whether an interface other than our bridge has an address in `subnet`.
    fn subnet_shared(&self, subnet: Subnet) -> Result<bool> {
        for family in ["-4", "-6"] {
            let text = cmd::run_ok(&["ip", "-o", family, "addr", "show"])?;
            for line in text.lines() {
                let mut words = line.split_whitespace();
                let ifname = words.nth(1).unwrap_or_default();
                let Some(addr) = words.nth(1) else { continue };
                let Some(addr) = addr
                    .split('/')
                    .next()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                else {
                    continue;
                };
                let full = if addr.is_ipv4() { 32 } else { 128 };
                if ifname != self.bridge && subnet.overlaps(addr, full) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn set_owner(&self, owner: &Owner) -> Result<()> {
        let alias = owner.alias(&self.name);
        cmd::run_ok(&["ip", "link", "set", "dev", &self.bridge, "alias", &alias]).map(drop)
    }

    /// Adds a pod on the lab bridge: namespace `lmn-<id>-<name>`, `eth0` with the next free
    /// `.N` / `::N`, default routes via the bridge, host side `lmh<id><N>` on the bridge.
    /// Returns once the addresses are usable. `name`: 1-32 characters of `[a-z0-9-]`.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        self.add_pod_to(None, name)
    }

    /// Adds a pod on `node` ([`Lab::add_node`]): namespace `lmn-<id>-<name>`, `eth0` with the
    /// next free `.N/32` / `::N/128`, default routes via the node (IPv4: the node's address;
    /// IPv6: `fe80::1` on the host side), host side `lmh<id><N>` in the node's namespace with a
    /// route to the pod there; every other node and the root namespace route `.N` / `::N` via
    /// the node. Returns once the addresses are usable.
    pub fn add_pod_on(&mut self, node: &str, name: &str) -> Result<Pod> {
        let node = self
            .node(node)
            .cloned()
            .with_context(|| format!("lab {} has no node {node:?}", self.id))?;
        self.add_pod_to(Some(&node), name)
    }

    fn add_pod_to(&mut self, node: Option<&Node>, name: &str) -> Result<Pod> {
        check_name("pod", name)?;
        if self.pods.iter().any(|p| p.name == name) {
            bail!("lab {} already has a pod {name:?}", self.id);
        }
        let n = self.claim_host()?;
        let netns = names::netns(&self.id, name);
        let host_if = names::host_if(&self.id, n);
        let made = match node {
            None => self.create_pod(name, n, &netns, &host_if),
            Some(node) => self.create_pod_on(node, name, n, &netns, &host_if),
        };
        match made {
            Ok(pod) => {
                self.pods.push(pod.clone());
                Ok(pod)
            }
            Err(e) => {
                let host_netns = node.map(|node| node.netns.as_str());
                let mut cleanup = destroy_netns_objects(&netns, host_netns, &host_if);
                if node.is_some() {
                    cleanup = cleanup.and(self.remove_routes_to(n));
                }
                if let Err(cleanup) = cleanup {
                    eprintln!("lumen-lab: cleaning up half-made pod {netns}: {cleanup:#}");
                }
                Err(e.context(format!("cannot add pod {name:?} to lab {}", self.id)))
            }
        }
    }

    /// The next host number, `.2` to `.254`.
    fn claim_host(&mut self) -> Result<u8> {
        let n = u8::try_from(self.next_host)
            .ok()
            .filter(|n| *n < 255)
            .with_context(|| format!("lab {} has no host addresses left", self.id))?;
        self.next_host += 1;
        Ok(n)
    }

    fn create_pod(&self, name: &str, n: u8, netns: &str, host_if: &str) -> Result<Pod> {
        let (ipv4, ipv6) = (self.subnet.ipv4(n), self.subnet.ipv6(n));
        let gw4 = self.subnet.ipv4(1).to_string();
        let gw6 = self.subnet.ipv6(1).to_string();
        cmd::run_ok(&["ip", "netns", "add", netns])?;
        self.plug_into_bridge(netns, host_if, n)?;
        cmd::run_ok(&["ip", "-n", netns, "route", "add", "default", "via", &gw4])?;
        cmd::run_ok(&[
            "ip", "-n", netns, "-6", "route", "add", "default", "via", &gw6,
        ])?;
        wait_pod_ready(netns, None, host_if)?;
        Ok(Pod {
            name: name.to_owned(),
            netns: netns.to_owned(),
            node: None,
            host_if: host_if.to_owned(),
            host_ifindex: ifindex(host_if)?,
            ipv4,
            ipv6,
        })
    }

    fn create_pod_on(
        &self,
        node: &Node,
        name: &str,
        n: u8,
        netns: &str,
        host_if: &str,
    ) -> Result<Pod> {
        let ipv4 = self.subnet.ipv4(n);
        let ipv6 = self.subnet.ipv6(n);
        let (v4, v6) = (format!("{ipv4}/32"), format!("{ipv6}/128"));
        let gw4 = node.ipv4.to_string();
        let gw6 = format!("{NODE_POD_GATEWAY6}/64");
        let node_ns = node.netns.as_str();
        let steps: [&[&str]; 14] = [
            &["ip", "netns", "add", netns],
            &[
                "ip", "-n", node_ns, "link", "add", host_if, "type", "veth", "peer", "name",
                "eth0", "netns", netns,
            ],
            // Only the gateway address below: no RS/MLD noise from a generated one.
            &[
                "ip",
                "-n",
                node_ns,
                "link",
                "set",
                "dev",
                host_if,
                "addrgenmode",
                "none",
            ],
            &["ip", "-n", node_ns, "link", "set", "dev", host_if, "up"],
            &[
                "ip", "-n", node_ns, "-6", "addr", "add", &gw6, "dev", host_if, "nodad",
            ],
            &["ip", "-n", node_ns, "route", "add", &v4, "dev", host_if],
            &[
                "ip", "-n", node_ns, "-6", "route", "add", &v6, "dev", host_if,
            ],
            &["ip", "-n", netns, "link", "set", "dev", "lo", "up"],
            &["ip", "-n", netns, "addr", "add", &v4, "dev", "eth0"],
            &[
                "ip", "-n", netns, "-6", "addr", "add", &v6, "dev", "eth0", "nodad",
            ],
            &["ip", "-n", netns, "link", "set", "dev", "eth0", "up"],
            // The node's address answers ARP on the host side (arp_ignore 0): an on-link
            // gateway without an address of its own on that veth.
            &[
                "ip", "-n", netns, "route", "add", &gw4, "dev", "eth0", "scope", "link",
            ],
            &[
                "ip", "-n", netns, "route", "add", "default", "via", &gw4, "dev", "eth0",
            ],
            &[
                "ip",
                "-n",
                netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                NODE_POD_GATEWAY6,
                "dev",
                "eth0",
            ],
        ];
        for argv in steps {
            cmd::run_ok(argv)?;
        }
        for other in self.nodes.iter().filter(|other| other.name != node.name) {
            add_routes(Some(&other.netns), self.subnet, n, node)?;
        }
        add_routes(None, self.subnet, n, node)?;
        wait_pod_ready(netns, Some(node_ns), host_if)?;
        Ok(Pod {
            name: name.to_owned(),
            netns: netns.to_owned(),
            node: Some(node.name.clone()),
            host_if: host_if.to_owned(),
            host_ifindex: ifindex_in(node_ns, host_if)?,
            ipv4,
            ipv6,
        })
    }

    /// Adds a node: namespace `lmnode-<id>-<name>` with forwarding on, `eth0` with the next
    /// free `.N/24` / `::N/64`, a veth to the bridge (`lmh<id><N>` in the root namespace), and
    /// routes to the pods already on other nodes. Put pods on it with [`Lab::add_pod_on`].
    /// `name`: 1-32 characters of `[a-z0-9-]`.
    pub fn add_node(&mut self, name: &str) -> Result<Node> {
        check_name("node", name)?;
        if self.nodes.iter().any(|n| n.name == name) {
            bail!("lab {} already has a node {name:?}", self.id);
        }
        let n = self.claim_host()?;
        let netns = names::node_netns(&self.id, name);
        let uplink = names::host_if(&self.id, n);
        match self.create_node(name, n, &netns, &uplink) {
            Ok(node) => {
                self.nodes.push(node.clone());
                Ok(node)
            }
            Err(e) => {
                if let Err(cleanup) = destroy_netns_objects(&netns, None, &uplink) {
                    eprintln!("lumen-lab: cleaning up half-made node {netns}: {cleanup:#}");
                }
                Err(e.context(format!("cannot add node {name:?} to lab {}", self.id)))
            }
        }
    }

    fn create_node(&self, name: &str, n: u8, netns: &str, uplink: &str) -> Result<Node> {
        let (ipv4, ipv6) = (self.subnet.ipv4(n), self.subnet.ipv6(n));
        cmd::run_ok(&["ip", "netns", "add", netns])?;
        // Before any interface exists, so every one inherits it: the node routes, and its
        // link-local addresses (the source of the neighbour solicitations it sends when
        // forwarding) are usable at once instead of after duplicate address detection.
        netns::sysctl(netns, "net/ipv4/ip_forward", "1")?;
        netns::sysctl(netns, "net/ipv6/conf/all/forwarding", "1")?;
        netns::sysctl(netns, "net/ipv6/conf/default/accept_dad", "0")?;
        self.plug_into_bridge(netns, uplink, n)?;
        wait_pod_ready(netns, None, uplink)?;
        let node = Node {
            name: name.to_owned(),
            netns: netns.to_owned(),
            uplink: uplink.to_owned(),
            ipv4,
            ipv6,
        };
        for pod in &self.pods {
            let Some(owner) = pod.node.as_deref().and_then(|o| self.node(o)) else {
                continue;
            };
            let host = self.subnet.host_of(pod.ipv4);
            add_routes(Some(netns), self.subnet, host, owner)?;
        }
        Ok(node)
    }

    /// Links namespace `netns` (a pod's or a node's) to the bridge: a veth from port
    /// `host_if` to `eth0` in `netns` with `.n/24` and `::n/64`; `eth0` and `lo` up.
    fn plug_into_bridge(&self, netns: &str, host_if: &str, n: u8) -> Result<()> {
        let v4 = format!("{}/24", self.subnet.ipv4(n));
        let v6 = format!("{}/64", self.subnet.ipv6(n));
        let steps: [&[&str]; 7] = [
            &[
                "ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns",
                netns,
            ],
            // The host side is a bridge port only: no link-local address, no RS/MLD noise.
            &["ip", "link", "set", "dev", host_if, "addrgenmode", "none"],
            &[
                "ip",
                "link",
                "set",
                "dev",
                host_if,
                "master",
                &self.bridge,
                "up",
            ],
            &["ip", "-n", netns, "link", "set", "dev", "lo", "up"],
            &["ip", "-n", netns, "addr", "add", &v4, "dev", "eth0"],
            &[
                "ip", "-n", netns, "-6", "addr", "add", &v6, "dev", "eth0", "nodad",
            ],
            &["ip", "-n", netns, "link", "set", "dev", "eth0", "up"],
        ];
        for argv in steps {
            cmd::run_ok(argv)?;
        }
        Ok(())
    }

    /// Deletes the routes other nodes and the root namespace have to host `.n` / `::n`.
    fn remove_routes_to(&self, n: u8) -> Result<()> {
        let v4 = format!("{}/32", self.subnet.ipv4(n));
        let v6 = format!("{}/128", self.subnet.ipv6(n));
        let mut argvs: Vec<Vec<&str>> = vec![
            vec!["ip", "route", "del", &v4],
            vec!["ip", "-6", "route", "del", &v6],
        ];
        for node in &self.nodes {
            argvs.push(vec!["ip", "-n", &node.netns, "route", "del", &v4]);
            argvs.push(vec!["ip", "-n", &node.netns, "-6", "route", "del", &v6]);
        }
        for argv in argvs {
            if let Err(e) = cmd::run_ok(&argv) {
                if !already_gone(&e) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes a pod: kills what runs in its namespace, deletes its veth pair and namespace.
    pub fn remove_pod(&mut self, name: &str) -> Result<Pod> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("lab {} has no pod {name:?}", self.id))?;
        let pod = self.pods.remove(i);
        destroy_netns_objects(&pod.netns, self.host_netns(&pod), &pod.host_if)?;
        if pod.node.is_some() {
            self.remove_routes_to(self.subnet.host_of(pod.ipv4))?;
        }
        Ok(pod)
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The bridge's name, `lmb<id>`.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }
    pub fn bridge_ifindex(&self) -> u32 {
        self.bridge_ifindex
    }
    /// The "host" address pods use as their IPv4 default gateway: `10.x.y.1`.
    pub fn bridge_ipv4(&self) -> Ipv4Addr {
        self.subnet.ipv4(1)
    }
    /// The IPv6 default gateway: `fd00:6c6d:xxyy::1`.
    pub fn bridge_ipv6(&self) -> Ipv6Addr {
        self.subnet.ipv6(1)
    }
    /// `10.x.y.0/24`.
    pub fn ipv4_cidr(&self) -> String {
        self.subnet.ipv4_cidr()
    }
    /// `fd00:6c6d:xxyy::/64`.
    pub fn ipv6_cidr(&self) -> String {
        self.subnet.ipv6_cidr()
    }
    /// Current pods (on the bridge and on nodes), in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }
    /// Current pods on node `node`, in creation order.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods
            .iter()
            .filter(move |p| p.node.as_deref() == Some(node))
    }
    /// Nodes, in creation order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
    /// Host-side veths of the current pods on the bridge (in the root namespace; those of
    /// pods on a node are in the node's namespace: [`Lab::pods_on`]).
    pub fn host_interfaces(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter(|p| p.node.is_none())
            .map(|p| p.host_if.clone())
            .collect()
    }
    /// The lab's interfaces in the root namespace: the bridge, the host-side veths of the
    /// pods on it, and the nodes' uplinks.
    pub fn interfaces(&self) -> Vec<String> {
        std::iter::once(self.bridge.clone())
            .chain(self.host_interfaces())
            .chain(self.nodes.iter().map(|n| n.uplink.clone()))
            .collect()
    }

    /// BPF attachments on each of [`Lab::interfaces`] and on the host-side veth of every pod
    /// on a node (in the node's namespace).
    pub fn attachments(&self) -> Result<Vec<Attachments>> {
        let root = self
            .interfaces()
            .into_iter()
            .map(|i| attach::attachments(&i));
        let on_nodes = self.pods.iter().filter_map(|p| {
            let netns = self.host_netns(p)?;
            Some(attach::attachments_in(netns, &p.host_if))
        });
        root.chain(on_nodes).collect()
    }

    /// The namespace of `pod`'s host-side veth: its node's, `None` for the root namespace.
    fn host_netns(&self, pod: &Pod) -> Option<&str> {
        let node = self.node(pod.node.as_deref()?)?;
        Some(node.netns.as_str())
    }

    /// Leaves the lab in place when dropped (for `cargo xtask lab up`); returns its id for
    /// [`Lab::destroy`]. [`Lab::cleanup_stale`] does not touch kept labs.
    pub fn keep(mut self) -> Result<String> {
        self.set_owner(&Owner::persistent())?;
        self.keep = true;
        Ok(self.id.clone())
    }

    /// Labs on this host (any process's), from their bridges and namespaces.
    pub fn list() -> Result<Vec<LabInfo>> {
        let links = link_names()?;
        let netns = netns_names()?;
        let mut labs: Vec<LabInfo> = Vec::new();
        for bridge in &links {
            let Some(id) = names::id_of_bridge(bridge) else {
                continue;
            };
            let alias = std::fs::read_to_string(format!("/sys/class/net/{bridge}/ifalias"))
                .unwrap_or_default();
            labs.push(LabInfo {
                id: id.to_owned(),
                bridge: Some(bridge.clone()),
                owner: Owner::parse(alias.trim()),
                host_interfaces: Vec::new(),
                netns: Vec::new(),
                node_netns: Vec::new(),
            });
        }
        let entry = |labs: &mut Vec<LabInfo>, id: &str| -> usize {
            if let Some(i) = labs.iter().position(|l| l.id == id) {
                return i;
            }
            labs.push(LabInfo {
                id: id.to_owned(),
                bridge: None,
                owner: None,
                host_interfaces: Vec::new(),
                netns: Vec::new(),
                node_netns: Vec::new(),
            });
            labs.len() - 1
        };
        for link in &links {
            if let Some(id) = names::id_of_host_if(link) {
                let i = entry(&mut labs, id);
                labs[i].host_interfaces.push(link.clone());
            }
        }
        for ns in &netns {
            if let Some((id, _pod)) = names::id_of_netns(ns) {
                let i = entry(&mut labs, id);
                labs[i].netns.push(ns.clone());
            }
            if let Some((id, _node)) = names::id_of_node_netns(ns) {
                let i = entry(&mut labs, id);
                labs[i].node_netns.push(ns.clone());
            }
        }
        Ok(labs)
    }

    /// Removes labs left behind by processes that died (crash, SIGKILL, abort), whose name
    /// starts with `name_prefix` (`""`: any). Only objects named like a lab's are considered:
    /// a lab whose owner is alive, or that was [kept](Lab::keep), or whose bridge has no
    /// lumen-lab alias is left alone; namespaces and veths whose bridge is gone are orphans
    /// (pods' and nodes') and always removed. Returns the names removed.
    pub fn cleanup_stale(name_prefix: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for lab in Self::list()? {
            let stale = match (&lab.bridge, &lab.owner) {
                // A bridge is created before anything else and deleted last: without it the
                // rest is an orphan.
                (None, _) => true,
                // Not (yet) labelled by a lab: maybe one being created right now.
                (Some(_), None) => false,
                (Some(_), Some(owner)) => {
                    !owner.persistent
                        && !owner.is_alive()
                        && owner.lab_name.starts_with(name_prefix)
                }
            };
            if stale {
                removed.extend(destroy_lab_objects(&lab.id)?);
            }
        }
        Ok(removed)
    }

    /// Removes every namespace and link of lab `id`, whoever owns it. Returns the names removed.
    pub fn destroy(id: &str) -> Result<Vec<String>> {
        if !names::is_id(id) {
            bail!("{id:?} is not a lab id (5 characters of [0-9a-z])");
        }
        destroy_lab_objects(id)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let mut errors = Vec::new();
        for pod in &self.pods {
            if let Err(e) = destroy_netns_objects(&pod.netns, self.host_netns(pod), &pod.host_if) {
                errors.push(e);
            }
        }
        self.pods.clear();
        // A node's routes and the host-side veths of its pods go with its namespace.
        for node in std::mem::take(&mut self.nodes) {
            if let Err(e) = destroy_netns_objects(&node.netns, None, &node.uplink) {
                errors.push(e);
            }
        }
        // Also catches anything a failed step left half-made.
        if let Err(e) = destroy_lab_objects(&self.id) {
            errors.push(e);
        }
        for e in errors {
            eprintln!("lumen-lab: cleaning up lab {}: {e:#}", self.id);
        }
    }
}

/// A lab found on the host by [`Lab::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabInfo {
    pub id: String,
    pub bridge: Option<String>,
    /// From the bridge's alias; `None` without a bridge or an alias of ours.
    pub owner: Option<Owner>,
    /// Host-side veths and node uplinks in the root namespace.
    pub host_interfaces: Vec<String>,
    /// Pod namespaces.
    pub netns: Vec<String>,
    /// Node namespaces.
    pub node_netns: Vec<String>,
}

/// Who made a lab: stored in its bridge's alias as
/// `lumen-lab name=<name> pid=<pid> start=<start time in clock ticks>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub lab_name: String,
    pub pid: u32,
    /// `/proc/<pid>/stat` start time, so a reused pid is not mistaken for the owner.
    pub start_time: u64,
    /// Kept with [`Lab::keep`]: no owning process.
    pub persistent: bool,
}

impl Owner {
    fn current() -> Result<Owner> {
        let pid = std::process::id();
        Ok(Owner {
            lab_name: String::new(),
            pid,
            start_time: process_start_time(pid).context("cannot read our own start time")?,
            persistent: false,
        })
    }

    fn persistent() -> Owner {
        Owner {
            lab_name: String::new(),
            pid: 0,
            start_time: 0,
            persistent: true,
        }
    }

    fn alias(&self, lab_name: &str) -> String {
        format!(
            "{ALIAS_TAG} name={lab_name} pid={} start={}",
            self.pid, self.start_time
        )
    }

    fn parse(alias: &str) -> Option<Owner> {
        let mut words = alias.split_whitespace();
        if words.next()? != ALIAS_TAG {
            return None;
        }
        let (mut name, mut pid, mut start) = (None, None, None);
        for word in words {
            match word.split_once('=')? {
                ("name", v) => name = Some(v.to_owned()),
                ("pid", v) => pid = v.parse().ok(),
                ("start", v) => start = v.parse().ok(),
                _ => {}
            }
        }
        let pid = pid?;
        Some(Owner {
            lab_name: name?,
            pid,
            start_time: start?,
            persistent: pid == 0,
        })
    }

    /// Whether the owning process still runs (same pid and start time).
    pub fn is_alive(&self) -> bool {
        !self.persistent && process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of `/proc/<pid>/stat`.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The ifindex of `iface` in namespace `netns`, from `ip -o link show` (`/sys/class/net` shows
/// the root namespace's interfaces).
fn ifindex_in(netns: &str, iface: &str) -> Result<u32> {
    let line = cmd::run_ok(&["ip", "-n", netns, "-o", "link", "show", "dev", iface])?;
    line.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no ifindex in `ip -o link show` of {iface} in {netns}: {line:?}"))
}

/// Pod and node names: 1-32 characters of `[a-z0-9-]`.
fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("{what} name {name:?} must be 1-32 characters of [a-z0-9-]");
    }
    Ok(())
}

/// Routes host `.n` / `::n` of `subnet` (a pod on node `via`) via the node's addresses, in
/// `netns` (`None`: the root namespace).
fn add_routes(netns: Option<&str>, subnet: Subnet, n: u8, via: &Node) -> Result<()> {
    let (v4, v6) = (
        format!("{}/32", subnet.ipv4(n)),
        format!("{}/128", subnet.ipv6(n)),
    );
    let (via4, via6) = (via.ipv4.to_string(), via.ipv6.to_string());
    let ns: &[&str] = match netns {
        Some(netns) => &["-n", netns],
        None => &[],
    };
    for route in [
        ["-4", "route", "add", &v4, "via", &via4],
        ["-6", "route", "add", &v6, "via", &via6],
    ] {
        let argv: Vec<&str> = std::iter::once("ip")
            .chain(ns.iter().copied())
            .chain(route)
            .collect();
        cmd::run_ok(&argv)?;
    }
    Ok(())
}

fn ifindex(iface: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{iface}/ifindex");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("malformed {path}: {text:?}"))
}

/// Waits until the pod's (or node's) eth0 has carrier, no tentative global IPv6 address, and
/// the host side forwards on the bridge (`host_netns` `None`) or has carrier in `host_netns`.
fn wait_pod_ready(netns: &str, host_netns: Option<&str>, host_if: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let link = cmd::run_ok(&["ip", "-n", netns, "-o", "link", "show", "dev", "eth0"])?;
        let tentative = cmd::run_ok(&[
            "ip",
            "-n",
            netns,
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
            "scope",
            "global",
            "tentative",
        ])?;
        let host_state = match host_netns {
            None => {
                // 3 = BR_STATE_FORWARDING.
                let state =
                    std::fs::read_to_string(format!("/sys/class/net/{host_if}/brport/state"))
                        .unwrap_or_default();
                format!("bridge port state {}", state.trim())
            }
            Some(host_netns) => {
                let link = cmd::run_ok(&["ip", "-n", host_netns, "-o", "link", "show", host_if])?;
                let carrier = if link.contains("LOWER_UP") {
                    "up"
                } else {
                    "down"
                };
                format!("host side {carrier}")
            }
        };
        let host_ready = matches!(host_state.as_str(), "bridge port state 3" | "host side up");
        let ready = link.contains("LOWER_UP") && tentative.trim().is_empty() && host_ready;
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{netns} not ready after {READY_TIMEOUT:?}: link {:?}, tentative {:?}, {host_state}",
                link.trim(),
                tentative.trim(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Interface names in the current namespace.
fn link_names() -> Result<Vec<String>> {
    let text = cmd::run_ok(&["ip", "-o", "link", "show"])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect())
}

fn netns_names() -> Result<Vec<String>> {
    let text = cmd::run_ok(&["ip", "netns", "list"])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Whether a failed delete only means the object was already gone.
fn already_gone(err: &anyhow::Error) -> bool {
    let text = format!("{err:#}");
    text.contains("Cannot find device")
        || text.contains("No such file")
        || text.contains("does not exist")
        // `ip route del` of a route that is gone.
        || text.contains("No such process")
}

/// Kills the processes in `netns` (a pod's or a node's), deletes its veth to the host by the
/// host end `host_if` (in `host_netns`, `None`: the root namespace) and the namespace.
/// Objects already gone are fine.
fn destroy_netns_objects(netns: &str, host_netns: Option<&str>, host_if: &str) -> Result<()> {
    kill_netns_processes(netns);
    let del_link: Vec<&str> = match host_netns {
        Some(host_netns) => vec!["ip", "-n", host_netns, "link", "del", "dev", host_if],
        None => vec!["ip", "link", "del", "dev", host_if],
    };
    let steps: [&[&str]; 2] = [&del_link, &["ip", "netns", "del", netns]];
    for argv in steps {
        if let Err(e) = cmd::run_ok(argv) {
            if !already_gone(&e) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// SIGKILLs whatever still runs in `netns` (servers whose guards were leaked).
fn kill_netns_processes(netns: &str) {
    let Ok(pids) = cmd::run_ok(&["ip", "netns", "pids", netns]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        let _ = cmd::signal(pid, "KILL");
    }
}

/// Deletes every namespace (pods' and nodes'), host veth and bridge named after lab `id`.
fn destroy_lab_objects(id: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for ns in netns_names()? {
        let ours = names::id_of_netns(&ns)
            .or_else(|| names::id_of_node_netns(&ns))
            .is_some_and(|(i, _)| i == id);
        if ours {
            kill_netns_processes(&ns);
            match cmd::run_ok(&["ip", "netns", "del", &ns]) {
                Ok(_) => removed.push(ns),
                Err(e) if already_gone(&e) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    for link in link_names()? {
        let ours =
            names::id_of_host_if(&link) == Some(id) || names::id_of_bridge(&link) == Some(id);
        if ours {
            match cmd::run_ok(&["ip", "link", "del", "dev", &link]) {
                Ok(_) => removed.push(link),
                Err(e) if already_gone(&e) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    if let Some(first) = errors.into_iter().next() {
        return Err(first.context(format!("cannot remove every object of lab {id}")));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_alias_round_trips() {
        let owner = Owner {
            lab_name: String::new(),
            pid: 4242,
            start_time: 99,
            persistent: false,
        };
        let parsed = Owner::parse(&owner.alias("http-flows")).expect("parses");
        assert_eq!(parsed.lab_name, "http-flows");
        assert_eq!((parsed.pid, parsed.start_time), (4242, 99));
        assert!(!parsed.persistent);
        assert!(
            Owner::parse(&Owner::persistent().alias("demo"))
                .expect("parses")
                .persistent
        );
        assert_eq!(Owner::parse("something else pid=1"), None);
        assert_eq!(Owner::parse(""), None);
    }

    #[test]
    fn we_are_alive_and_a_wrong_start_time_is_not() {
        let me = Owner::current().expect("own stat");
        assert!(me.is_alive());
        let reused = Owner {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive());
    }
}
