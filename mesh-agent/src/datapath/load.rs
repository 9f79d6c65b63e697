//! Loading and attaching: [`Datapath::open`], the programs' objects and their pinned links.

use std::{
    fs, io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, LinkOrder,
        ProgramError, SchedClassifier, SockOps, links::FdLink, tc::TcAttachOptions,
    },
};
use mesh_maps::{
    LbMaps, LbRawMaps, MAP_BACKENDS, MAP_FLOWS, MAP_IPCACHE, MAP_REV_NAT, MAP_SERVICES,
    sys::{self as bpf, Access},
};

use super::*;

// === impl Datapath ===

impl Datapath {
    /// Loads the programs, creates or reuses the pinned maps, and attaches or
    /// takes over the pinned links (see the module documentation).
    pub fn open(config: DatapathConfig) -> Result<Self> {
        let DatapathConfig {
            pin_dir,
            cgroup_path,
            flow_iface,
            flow_netns,
        } = config;
        ensure_bpffs(&pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }

        check_pinned_maps(&maps_dir)?;
        let mut sock_lb = load_object("sock_lb.bpf.o", SOCK_LB_OBJ, &maps_dir)?;
        // Typed handles first: nothing is attached if a map is not as expected.
        let services = take_map(&mut sock_lb, MAP_SERVICES)?;
        let backends = take_map(&mut sock_lb, MAP_BACKENDS)?;
        let ipcache = take_map(&mut sock_lb, MAP_IPCACHE)?;
        let flows = take_map(&mut sock_lb, MAP_FLOWS)?;
        // Only the programs use its content; held so its fd stays valid
        // until the programs are loaded.
        let rev_nat = take_map(&mut sock_lb, MAP_REV_NAT)?;
        let health = health::HealthMaps {
            counters: take_map(&mut sock_lb, mesh_maps::MAP_BACKEND_HEALTH)?,
            quarantine: take_map(&mut sock_lb, mesh_maps::MAP_QUARANTINE)?,
        };
        let events = EventMaps::new(
            take_map(&mut sock_lb, mesh_maps::MAP_EVENTS)?,
            take_map(&mut sock_lb, mesh_maps::MAP_EVENT_CONFIG)?,
            take_map(&mut sock_lb, mesh_maps::MAP_EVENT_STATS)?,
        );
        let mut links = Vec::new();

        let cgroup = fs::File::open(&cgroup_path).map_err(|source| Error::Cgroup {
            path: cgroup_path.clone(),
            source,
        })?;
        let cgroup_id = cgroup
            .metadata()
            .map_err(|source| Error::Cgroup {
                path: cgroup_path.clone(),
                source,
            })?
            .ino();
        let cg = CgroupTarget {
            file: &cgroup,
            id: cgroup_id,
            links_dir: &links_dir,
        };
        for &(name, attach_type) in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut sock_lb, name)?;
            links.push(cg.attach(name, attach_type, prog, |p, file| {
                let id = p
                    .attach(file, CgroupAttachMode::Single)
                    .map_err(program_err(name))?;
                fd_link(name, p.take_link(id).map_err(program_err(name))?)
            })?);
        }
        let name = POLICY_INGRESS_PROGRAM;
        let prog: &mut CgroupSkb = program(&mut sock_lb, name)?;
        links.push(
            cg.attach(name, bpf::BPF_CGROUP_INET_INGRESS, prog, |p, file| {
                let id = p
                    .attach(file, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                    .map_err(program_err(name))?;
                fd_link(name, p.take_link(id).map_err(program_err(name))?)
            })?,
        );
        let name = SOCK_OPS_PROGRAM;
        let prog: &mut SockOps = program(&mut sock_lb, name)?;
        links.push(cg.attach(name, bpf::BPF_CGROUP_SOCK_OPS, prog, |p, file| {
            let id = p
                .attach(file, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            fd_link(name, p.take_link(id).map_err(program_err(name))?)
        })?);
        let name = SOCK_RELEASE_PROGRAM;
        let prog: &mut CgroupSock = program(&mut sock_lb, name)?;
        links.push(
            cg.attach(name, bpf::BPF_CGROUP_INET_SOCK_RELEASE, prog, |p, file| {
                let id = p
                    .attach(file, CgroupAttachMode::Single)
                    .map_err(program_err(name))?;
                fd_link(name, p.take_link(id).map_err(program_err(name))?)
            })?,
        );

        let mut objects = Vec::new();
        match &flow_iface {
            Some(iface) => {
                let mut flows = load_object("flows.bpf.o", FLOWS_OBJ, &maps_dir)?;
                let flows_ref = &mut flows;
                let links_dir = &links_dir;
                let mut attach = move || attach_flows(flows_ref, iface, links_dir);
                let flow_links = match &flow_netns {
                    Some(netns) => {
                        sys::run_in_netns(netns, attach).map_err(|source| Error::Netns {
                            path: netns.clone(),
                            source,
                        })??
                    }
                    None => attach()?,
                };
                links.extend(flow_links);
                objects.push(flows);
            }
            None => {
                for &(name, _, _) in FLOWS_LINKS {
                    remove_pin(&links_dir.join(name))?;
                }
            }
        }

        objects.push(sock_lb);
        let raw = LbRawMaps::open_pinned(&maps_dir, Access::ReadWrite)?;
        let policy = mesh_maps::policy::PolicyMaps::open_pinned(&maps_dir, Access::ReadWrite)?;

        tracing::info!(pin_dir = %pin_dir.display(), cgroup = %cgroup_path.display(),
            flow_iface = ?flow_iface, ?links, "datapath open");
        Ok(Self {
            pin_dir,
            lb: LbMaps {
                services,
                backends,
                ipcache,
                raw,
            },
            flows,
            policy,
            events: Some(events),
            health,
            _rev_nat: rev_nat,
            batch: BatchSupport {
                services: true,
                backends: true,
                ipcache: true,
            },
            links,
            objects,
        })
    }

    /// The flow-event maps (once: the flow reader owns them).
    pub fn take_events(&mut self) -> Option<EventMaps> {
        self.events.take()
    }

    /// The links set up by [`Datapath::open`], and whether each was reused.
    pub fn links(&self) -> &[LinkStatus] {
        &self.links
    }

    /// Run time and runs of each loaded program (zero unless [`RunTimeStats`] are on).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        let mut out = Vec::new();
        for obj in &self.objects {
            for (name, prog) in obj.programs() {
                let info = prog.info().map_err(|e| Error::ProgramInfo {
                    program: name.to_owned(),
                    source: Box::new(e),
                })?;
                out.push(ProgramStats {
                    name: name.to_owned(),
                    run_time: info.run_time(),
                    run_count: info.run_count(),
                });
            }
        }
        Ok(out)
    }

    /// The per-node pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Closes the maps and program handles. Programs stay attached and the
    /// maps pinned, so sockets keep being load balanced with the current maps.
    pub fn close(self) {}
}

/// The cgroup every cgroup program of sock_lb.bpf.o attaches to.
struct CgroupTarget<'a> {
    file: &'a fs::File,
    id: u64,
    links_dir: &'a Path,
}

impl CgroupTarget<'_> {
    /// Loads `prog` and takes over its pinned link on the cgroup, or attaches it with
    /// `attach` and pins the new link.
    fn attach<T: LoadableProgram>(
        &self,
        name: &'static str,
        attach_type: u32,
        prog: &mut T,
        attach: impl FnOnce(&mut T, &fs::File) -> Result<FdLink>,
    ) -> Result<LinkStatus> {
        prog.load_program().map_err(program_err(name))?;
        let prog_fd = program_fd(name, prog.program_fd())?;
        let pin = self.links_dir.join(name);
        let expect = ExpectedLink {
            link_type: bpf::BPF_LINK_TYPE_CGROUP,
            target: self.id,
            attach_type,
        };
        let state = ensure_link(&pin, &prog_fd, expect, || attach(prog, self.file))?;
        Ok(LinkStatus { name, pin, state })
    }
}

/// The pinnable form of a cgroup program's link.
fn fd_link<L>(program: &'static str, link: L) -> Result<FdLink>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|source| Error::LinkFd { program, source })
}

/// Loads `name` of `ebpf` as a `T` program.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram {
            object: "sock_lb.bpf.o",
            program: name,
        })?
        .try_into()
        .map_err(program_err(name))
}

/// The cgroup program types sock_lb.bpf.o attaches: load and fd, uniformly.
trait LoadableProgram {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError>;
    fn program_fd(&self) -> std::result::Result<&aya::programs::ProgramFd, ProgramError>;
}

macro_rules! loadable {
    ($($t:ty),*) => {$(
        impl LoadableProgram for $t {
            fn load_program(&mut self) -> std::result::Result<(), ProgramError> {
                self.load()
            }
            fn program_fd(&self) -> std::result::Result<&aya::programs::ProgramFd, ProgramError> {
                self.fd()
            }
        }
    )*};
}
loadable!(CgroupSockAddr, CgroupSkb, SockOps, CgroupSock);

/// Loads the classifier and attaches it at TCX ingress and egress of `iface`
/// (in the calling thread's network namespace), reusing pinned links.
fn attach_flows(flows: &mut Ebpf, iface: &str, links_dir: &Path) -> Result<Vec<LinkStatus>> {
    let ifindex = sys::ifindex(iface).map_err(|source| Error::Interface {
        iface: iface.to_owned(),
        source,
    })?;
    let prog: &mut SchedClassifier = flows
        .program_mut(FLOWS_PROGRAM)
        .ok_or(Error::MissingProgram {
            object: "flows.bpf.o",
            program: FLOWS_PROGRAM,
        })?
        .try_into()
        .map_err(program_err(FLOWS_PROGRAM))?;
    prog.load().map_err(program_err(FLOWS_PROGRAM))?;
    let prog_fd = program_fd(FLOWS_PROGRAM, prog.fd())?;
    let mut links = Vec::new();
    for &(name, tc_type, attach_type) in FLOWS_LINKS {
        let pin = links_dir.join(name);
        let expect = ExpectedLink {
            link_type: bpf::BPF_LINK_TYPE_TCX,
            target: u64::from(ifindex),
            attach_type,
        };
        let state = ensure_link(&pin, &prog_fd, expect, || {
            let id = prog
                .attach_with_options(
                    iface,
                    tc_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(program_err(FLOWS_PROGRAM))?;
            let link = prog.take_link(id).map_err(program_err(FLOWS_PROGRAM))?;
            FdLink::try_from(link).map_err(|source| Error::LinkFd {
                program: FLOWS_PROGRAM,
                source,
            })
        })?;
        links.push(LinkStatus { name, pin, state });
    }
    Ok(links)
}

#[derive(Clone, Copy, Debug)]
struct ExpectedLink {
    link_type: u32,
    target: u64,
    attach_type: u32,
}

/// Takes over the link pinned at `pin` if it is attached where expected
/// (replacing its program in place), else replaces it with a new one.
fn ensure_link(
    pin: &Path,
    prog_fd: &OwnedFd,
    expect: ExpectedLink,
    attach: impl FnOnce() -> Result<FdLink>,
) -> Result<LinkState> {
    let link_err = |source| Error::Link {
        path: pin.to_path_buf(),
        source,
    };
    match bpf::obj_get(pin, Access::ReadWrite) {
        Ok(link) => {
            let info = bpf::link_info(link.as_fd()).map_err(link_err)?;
            if info.link_type == expect.link_type
                && info.target == expect.target
                && info.attach_type == expect.attach_type
            {
                bpf::link_update(link.as_fd(), prog_fd.as_fd()).map_err(link_err)?;
                return Ok(LinkState::Reused);
            }
            tracing::info!(pin = %pin.display(), ?info, ?expect,
                "pinned link attached elsewhere or defunct; replacing it");
            // Removing the pin and closing our fd detaches the old link.
            fs::remove_file(pin).map_err(link_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(link_err(e)),
    }
    let link = attach()?;
    link.pin(pin).map_err(|e| Error::Link {
        path: pin.to_path_buf(),
        source: io::Error::other(e),
    })?;
    Ok(LinkState::Attached)
}

fn load_object(object: &'static str, bytes: &[u8], maps_dir: &Path) -> Result<Ebpf> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .load(bytes)
        .map_err(|source| Error::Load {
            object,
            source: Box::new(source),
        })
}

fn take_map<M>(ebpf: &mut Ebpf, map: &'static str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let raw = ebpf.take_map(map).ok_or(Error::MissingMap {
        object: "sock_lb.bpf.o",
        map,
    })?;
    M::try_from(raw).map_err(map_err(map))
}

fn program_fd(
    program: &'static str,
    fd: Result<&aya::programs::ProgramFd, ProgramError>,
) -> Result<OwnedFd> {
    fd.map_err(program_err(program))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::Program {
            program,
            source: Box::new(ProgramError::IOError(e)),
        })
}

fn program_err<E: Into<ProgramError>>(program: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Program {
        program,
        source: Box::new(e.into()),
    }
}
