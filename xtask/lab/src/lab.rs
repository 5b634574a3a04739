//! The lab: a bridge in the root namespace acting as the node's host, and pods (network
//! namespaces) attached to it by veth pairs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::attach::{self, Attachments};
use crate::cmd;
use crate::names::{self, Subnet};
use crate::pod::Pod;

/// How long a new pod may take until its addresses are usable.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Marks a bridge's `ifalias` as ours; the rest says who owns the lab.
const ALIAS_TAG: &str = "lumen-lab";

/// A lab of pods on one bridge. Dropping it deletes every namespace and link it created,
/// also while unwinding from a panic; [`Lab::cleanup_stale`] handles processes that died.
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
pub struct Lab {
    id: String,
    name: String,
    bridge: String,
    bridge_ifindex: u32,
    subnet: Subnet,
    pods: Vec<Pod>,
    /// Host number of the next pod (the bridge is `.1`); never reused, so churn gets new names.
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

    /// Adds a pod: namespace `lmn-<id>-<name>`, `eth0` with the next free `.N` / `::N`,
    /// default routes via the bridge, host side `lmh<id><N>` on the bridge. Returns once the
    /// addresses are usable. `name`: 1-32 characters of `[a-z0-9-]`.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        if name.is_empty()
            || name.len() > 32
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            bail!("pod name {name:?} must be 1-32 characters of [a-z0-9-]");
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("lab {} already has a pod {name:?}", self.id);
        }
        let n = u8::try_from(self.next_host)
            .ok()
            .filter(|n| *n < 255)
            .with_context(|| format!("lab {} has no host addresses left", self.id))?;
        self.next_host += 1;
        let netns = names::netns(&self.id, name);
        let host_if = names::host_if(&self.id, n);
        match self.create_pod(name, n, &netns, &host_if) {
            Ok(pod) => {
                self.pods.push(pod.clone());
                Ok(pod)
            }
            Err(e) => {
                if let Err(cleanup) = destroy_pod_objects(&netns, &host_if) {
                    eprintln!("lumen-lab: cleaning up half-made pod {netns}: {cleanup:#}");
                }
                Err(e.context(format!("cannot add pod {name:?} to lab {}", self.id)))
            }
        }
    }

    fn create_pod(&self, name: &str, n: u8, netns: &str, host_if: &str) -> Result<Pod> {
        let ipv4 = self.subnet.ipv4(n);
        let ipv6 = self.subnet.ipv6(n);
        let v4 = format!("{ipv4}/24");
        let v6 = format!("{ipv6}/64");
        let gw4 = self.subnet.ipv4(1).to_string();
        let gw6 = self.subnet.ipv6(1).to_string();
        let steps: [&[&str]; 10] = [
            &["ip", "netns", "add", netns],
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
            &["ip", "-n", netns, "route", "add", "default", "via", &gw4],
            &[
                "ip", "-n", netns, "-6", "route", "add", "default", "via", &gw6,
            ],
        ];
        for argv in steps {
            cmd::run_ok(argv)?;
        }
        wait_pod_ready(netns, host_if)?;
        Ok(Pod {
            name: name.to_owned(),
            netns: netns.to_owned(),
            host_if: host_if.to_owned(),
            host_ifindex: ifindex(host_if)?,
            ipv4,
            ipv6,
        })
    }

    /// Removes a pod: kills what runs in its namespace, deletes its veth pair and namespace.
    pub fn remove_pod(&mut self, name: &str) -> Result<Pod> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("lab {} has no pod {name:?}", self.id))?;
        let pod = self.pods.remove(i);
        destroy_pod_objects(&pod.netns, &pod.host_if)?;
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
    /// Current pods, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }
    /// Host-side veths of the current pods.
    pub fn host_interfaces(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.host_if.clone()).collect()
    }
    /// The bridge and every current host-side veth.
    pub fn interfaces(&self) -> Vec<String> {
        std::iter::once(self.bridge.clone())
            .chain(self.host_interfaces())
            .collect()
    }

    /// BPF attachments on each of [`Lab::interfaces`].
    pub fn attachments(&self) -> Result<Vec<Attachments>> {
        self.interfaces()
            .iter()
            .map(|i| attach::attachments(i))
            .collect()
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
        }
        Ok(labs)
    }

    /// Removes labs left behind by processes that died (crash, SIGKILL, abort), whose name
    /// starts with `name_prefix` (`""`: any). Only objects named like a lab's are considered:
    /// a lab whose owner is alive, or that was [kept](Lab::keep), or whose bridge has no
    /// lumen-lab alias is left alone; namespaces and veths whose bridge is gone are orphans
    /// and always removed. Returns the names removed.
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
        for pod in std::mem::take(&mut self.pods) {
            if let Err(e) = destroy_pod_objects(&pod.netns, &pod.host_if) {
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
    pub host_interfaces: Vec<String>,
    pub netns: Vec<String>,
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

fn ifindex(iface: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{iface}/ifindex");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("malformed {path}: {text:?}"))
}

/// Waits until the pod's eth0 has carrier, no tentative global IPv6 address, and the host side
/// forwards on the bridge.
fn wait_pod_ready(netns: &str, host_if: &str) -> Result<()> {
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
        let port_state = std::fs::read_to_string(format!("/sys/class/net/{host_if}/brport/state"))
            .unwrap_or_default();
        // 3 = BR_STATE_FORWARDING.
        let ready =
            link.contains("LOWER_UP") && tentative.trim().is_empty() && port_state.trim() == "3";
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "pod {netns} not ready after {READY_TIMEOUT:?}: link {:?}, tentative {:?}, \
                 bridge port state {:?}",
                link.trim(),
                tentative.trim(),
                port_state.trim()
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
}

/// Kills the processes in `netns`, deletes `host_if` (and with it the pod's eth0) and the
/// namespace. Objects already gone are fine.
fn destroy_pod_objects(netns: &str, host_if: &str) -> Result<()> {
    kill_netns_processes(netns);
    let steps: [&[&str]; 2] = [
        &["ip", "link", "del", "dev", host_if],
        &["ip", "netns", "del", netns],
    ];
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

/// Deletes every namespace, host veth and bridge named after lab `id`.
fn destroy_lab_objects(id: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for ns in netns_names()? {
        if names::id_of_netns(&ns).is_some_and(|(i, _)| i == id) {
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
