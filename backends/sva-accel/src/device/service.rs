//! The device's `/dev/iommu` service: the iommu-core context and device
//! it serves ([`serve_iommu_with`]), the binding the device starts with
//! ([`IommuBinding`]), the check that a client's PASID is its own, and the
//! observer that unbinds clients whose PASID their session gives up.

use super::*;

/// Label of the device in the daemon's own `/dev/iommu` service.
pub const DEFAULT_LABEL: &str = "sva0";

/// Hardware information the device reports to iommu-core: 20-bit PASIDs
/// and I/O page faults.
pub fn hw_info() -> ioasis::iommu::HwInfo {
    ioasis::iommu::HwInfo {
        max_pasid_log2: 20,
        iopf: true,
        ..ioasis::iommu::HwInfo::default()
    }
}

/// Creates an iommu-core context with a device `label` bound to it and
/// serves it as a `/dev/iommu` service on `path`. Start the device with the
/// returned binding ([`Accelerator::start_with`]); keep the thread alive.
pub fn serve_iommu(
    path: &Path,
    label: &str,
) -> Result<(IommuBinding, ioasis::service::ServiceThread)> {
    serve_iommu_with_policy(path, label, SocketPolicy::default())
}

/// [`serve_iommu`] with the service socket's mode and group from `policy`
/// (clients' credentials are checked against it).
pub fn serve_iommu_with_policy(
    path: &Path,
    label: &str,
    policy: SocketPolicy,
) -> Result<(IommuBinding, ioasis::service::ServiceThread)> {
    serve_iommu_with(
        path,
        label,
        policy,
        &ioasis::service::ServiceOptions::default(),
    )
}

/// [`serve_iommu_with_policy`] with the administrator's service options
/// (grants).
pub fn serve_iommu_with(
    path: &Path,
    label: &str,
    policy: SocketPolicy,
    options: &ioasis::service::ServiceOptions,
) -> Result<(IommuBinding, ioasis::service::ServiceThread)> {
    let iommu = ioasis::iommu::Iommu::new();
    let device = ioasis::iommu::IommuDevice::new(label, hw_info());
    iommu.bind(&device).map_err(|source| DeviceError::Bind {
        label: label.to_owned(),
        source,
    })?;
    let dir = Arc::new(ioasis::service::StaticDirectory::new());
    dir.insert(device.clone());
    let svc =
        ioasis::service::Service::bind_with_policy(path, iommu, dir, policy).map_err(|source| {
            DeviceError::Service {
                path: path.to_path_buf(),
                source,
            }
        })?;
    svc.configure(options);
    let service = svc.handle();
    let thread = svc.spawn().map_err(|source| DeviceError::Thread {
        name: "ioasis-service".into(),
        source,
    })?;
    Ok((IommuBinding { device, service }, thread))
}

/// The device as an iommu-core device offered by a `/dev/iommu` service:
/// clients then bring an IOAS and a PASID they set up through the service,
/// and every access is translated by iommu-core for (device, PASID).
#[derive(Clone)]
pub struct IommuBinding {
    /// The iommu-core device (bound to the service's context, PASID and
    /// IOPF capable).
    pub device: ioasis::iommu::IommuDevice,
    /// The service whose sessions own the PASIDs clients present.
    pub service: ServiceHandle,
}

impl std::fmt::Debug for IommuBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuBinding")
            .field("device", &self.device.label())
            .finish_non_exhaustive()
    }
}

/// Unbinds device clients whose PASID their service session gives up,
/// before (session closing) or right after (PASID freed) the detach, so that
/// no descriptor of theirs starts translating for a PASID that may be handed
/// to another session next, and aborts their outstanding work
/// ([`abort_work`]): when a closing session's PASID is detached and its
/// IOAS destroyed, nothing of that client is executing, parked or held.
pub(super) struct Unbinder {
    pub(super) shared: std::sync::Weak<Shared>,
}

impl Unbinder {
    fn unbind(&self, session: u64, label: &str, pasid: u32) {
        let Some(s) = self.shared.upgrade() else {
            return;
        };
        if s.iommu.device.label() != label {
            return;
        }
        let list = match s.clients.read() {
            Ok(l) => l.clone(),
            Err(_) => return,
        };
        for c in list.iter() {
            if c.session == session && c.pasid == pasid {
                c.unbound.store(true, Ordering::SeqCst);
                let n = abort_work(&s, c);
                ioasis::log_limited!(
                    log::Level::Info,
                    "PASID {pasid}: released by session {session}; client unbound, \
                     {} descriptors aborted, {} finished executing",
                    n.aborted,
                    n.finished
                );
            }
        }
    }
}

impl ioasis::service::ServiceObserver for Unbinder {
    fn session_closing(&self, session: &ioasis::service::SessionInfo, pasids: &[(String, u32)]) {
        for (label, pasid) in pasids {
            self.unbind(session.id, label, *pasid);
        }
    }

    fn pasid_released(&self, session: &ioasis::service::SessionInfo, label: &str, pasid: u32) {
        self.unbind(session.id, label, pasid);
    }
}

/// Checks that the session presenting `pasid` reserved it from the service
/// and is the process on the other end of `conn`, and that no live client
/// has bound it already. Returns the peer's uid.
pub(super) fn check_pasid_owner(
    s: &Shared,
    conn: BorrowedFd<'_>,
    session: u64,
    pasid: u32,
) -> std::result::Result<u32, i32> {
    let b = &s.iommu;
    let Some(owner) = b.service.pasid_owner(b.device.label(), pasid) else {
        return Err(libc::EPERM);
    };
    if owner.id != session {
        return Err(libc::EPERM);
    }
    let peer =
        ioasis::ownership::Peer::of(conn).map_err(|e| e.raw_os_error().unwrap_or(libc::EPERM))?;
    if peer.pid != owner.pid {
        return Err(libc::EPERM);
    }
    let taken = s
        .clients
        .read()
        .map(|l| {
            l.iter().any(|c| {
                c.pasid == pasid
                    && !c.dead.load(Ordering::SeqCst)
                    && !c.unbound.load(Ordering::SeqCst)
            })
        })
        .unwrap_or(true);
    if taken {
        return Err(libc::EBUSY);
    }
    Ok(peer.uid)
}
