//! The request dispatcher: what each request of a session does, once the
//! session loop ([`super`]) has received and decoded it. Every request is
//! checked against the session's ownership of the objects it names, the
//! grants of the devices it names and the session's budgets before it
//! reaches iommu-core; a failure is a [`Fail`] (errno and message) the
//! loop sends back as the reply.

use super::*;

/// A request failure: the errno and message sent back.
#[derive(Debug)]
pub(super) struct Fail {
    pub(super) errno: i32,
    pub(super) aux: u32,
    pub(super) message: String,
}

impl Fail {
    pub(super) fn new(errno: i32, message: impl Into<String>) -> Self {
        Fail {
            errno,
            aux: 0,
            message: message.into(),
        }
    }
}

impl From<iommu_core::Error> for Fail {
    fn from(e: iommu_core::Error) -> Self {
        Fail::new(e.errno(), e.to_string())
    }
}

impl From<ProtoError> for Fail {
    fn from(e: ProtoError) -> Self {
        Fail::new(e.errno(), e.to_string())
    }
}

pub(super) type Handled = Result<(ReplyBody, u32, Option<OwnedFd>), Fail>;

impl Service {
    /// ATTACH of the RID of a device a vhost-user connection may hold:
    /// replaces the connection's attachment (or attaches, if none) and
    /// records the session as the owner.
    fn take_rid(
        &mut self,
        sid: u64,
        rid: &RidOwnership,
        dev_id: u32,
        label: &str,
        pt_id: u32,
        owned: bool,
    ) -> Result<u32, Fail> {
        let iommu = self.shared.iommu.clone();
        let peer = self.session(sid)?.info.peer();
        let mut st = rid.lock();
        if st.owner == Some(sid) && !owned {
            return Err(Fail::new(
                libc::EBUSY,
                format!("the RID of {label:?} is already owned by this session"),
            ));
        }
        if let Err(r) = st.check_takeover(sid, &peer) {
            let message = match &r {
                Refusal::NotIovas => format!(
                    "the vhost-user frontend of {label:?} did not negotiate VIRTIO_F_ACCESS_PLATFORM: \
                     its addresses are guest physical, not IOVAs of an IOAS"
                ),
                r => format!("the RID of {label:?}: {r}"),
            };
            debug!("service: session {sid} ({peer}): {message}");
            return Err(Fail::new(r.errno(), message));
        }
        let (hwpt, ticket) = if iommu.attached_hwpt(dev_id, None)?.is_some() {
            iommu.replace_begin(dev_id, None, pt_id)?
        } else {
            (
                iommu.attach(dev_id, None, pt_id)?,
                InvalidationTicket::done(),
            )
        };
        if st.owner.is_none() {
            crate::log_limited!(
                log::Level::Info,
                "service: session {sid} took the RID of {label:?} (HWPT {hwpt})"
            );
        }
        st.owner = Some(sid);
        drop(st);
        // The reply waits until no worker uses the holder's translations.
        self.defer(ticket);
        rid.resume_parked();
        Ok(hwpt)
    }
    /// Device `label` must be granted to session `sid`: by the grants, or
    /// by a handover token it redeemed from the device's frontend.
    fn require_grant(&self, sid: u64, label: &str, what: &str) -> Result<(), Fail> {
        let peer = self
            .sessions
            .get(&sid)
            .map(|s| s.info.peer())
            .ok_or_else(|| Fail::new(libc::ENOENT, "session is gone"))?;
        if self.shared.grants().allows(label, &peer) {
            return Ok(());
        }
        if let Some(rid) = self.shared.dir.rid_ownership(label) {
            if rid.lock().redeemed_by(sid) {
                return Ok(());
            }
        }
        debug!("service: session {sid} ({peer}) refused {what} of {label:?}: not granted");
        Err(Fail::new(
            libc::EPERM,
            format!(
                "{what}: device {label:?} is not granted to this session ({peer}); \
                 the daemon grants devices with --grant {label}=UID"
            ),
        ))
    }

    /// `RID_TOKEN`: only the process of the device's connected frontend
    /// may hand its consent over.
    fn rid_token(&mut self, sid: u64, label: &str) -> Handled {
        self.device(label)?;
        let peer = self.session(sid)?.info.peer();
        let rid = self.shared.dir.rid_ownership(label).ok_or_else(|| {
            Fail::new(
                libc::ENOENT,
                format!("device {label:?} has no frontend that holds its RID"),
            )
        })?;
        match rid.holder_peer() {
            None if !rid.has_holder() => Err(Fail::new(
                libc::ENOENT,
                format!("no frontend is connected to {label:?}"),
            )),
            Some(h) if h.pid == peer.pid => {
                let t = rid
                    .issue_token()
                    .map_err(|e| Fail::new(errno_of(&e), format!("random token: {e}")))?
                    .ok_or_else(|| {
                        Fail::new(
                            libc::ENOENT,
                            format!("no frontend is connected to {label:?}"),
                        )
                    })?;
                log_limited!(
                    log::Level::Info,
                    "service: session {sid} ({peer}), the frontend of {label:?}, took a handover token"
                );
                Ok((ReplyBody::Token(t.bytes()), 0, None))
            }
            _ => Err(Fail::new(
                libc::EPERM,
                format!("only the process of {label:?}'s frontend may hand over its RID"),
            )),
        }
    }

    fn device(&self, label: &str) -> Result<(IommuDevice, u32), Fail> {
        let dev = self
            .shared
            .dir
            .device(label)
            .ok_or_else(|| Fail::new(libc::ENOENT, format!("no device {label:?}")))?;
        let id = dev
            .dev_id()
            .ok_or_else(|| Fail::new(libc::ENOENT, format!("device {label:?} is not bound")))?;
        Ok((dev, id))
    }

    pub(super) fn execute(&mut self, sid: u64, req: Request, mut fds: Vec<OwnedFd>) -> Handled {
        let iommu = self.shared.iommu.clone();
        let ok = |b: ReplyBody| Ok((b, 0, None));
        match req {
            Request::Hello => ok(ReplyBody::Hello {
                session_id: sid,
                server_pid: std::process::id(),
            }),
            Request::IoasAlloc => {
                self.room_for_object(sid)?;
                let id = iommu.ioas_alloc()?;
                self.add_object(sid, id, Owned::Ioas)?;
                ok(ReplyBody::Id(id))
            }
            Request::Destroy { id } => self.destroy(sid, id),
            Request::IoasMap {
                flags,
                ioas_id,
                offset,
                length,
                iova,
            } => {
                let perm = map_perm(flags)?;
                self.session(sid)?
                    .require(ioas_id, &[Owned::Ioas], "IOAS")?;
                let fd = fds
                    .pop()
                    .ok_or_else(|| Fail::new(libc::EBADF, "IOAS_MAP needs a memfd"))?;
                check_sealed(fd.as_fd())?;
                let len = usize::try_from(length)
                    .map_err(|_| Fail::new(libc::EOVERFLOW, "length exceeds the address space"))?;
                {
                    let sess = self
                        .sessions
                        .get_mut(&sid)
                        .ok_or_else(|| Fail::new(libc::ENOENT, "session is gone"))?;
                    sess.sweep(&mut self.shared.ledger());
                    if sess.mappings.len() >= MAX_MAPPINGS_PER_SESSION {
                        return Err(Fail::new(
                            libc::ENOSPC,
                            format!("session has {MAX_MAPPINGS_PER_SESSION} mappings"),
                        ));
                    }
                }
                // The mapping costs the daemon `len` bytes of address space
                // and the memfd it keeps open.
                let cost = [(Resource::MappedBytes, length), (Resource::Fds, 1)];
                self.room(sid, &cost, "IOAS_MAP")?;
                let mem = Memory::from_memfd(fd, offset, len)?;
                let fixed = (flags & MAP_FIXED_IOVA != 0).then_some(iova);
                let iova = iommu.ioas_map(ioas_id, &mem, 0, length, fixed, perm)?;
                self.charge(sid, &cost);
                self.session(sid)?
                    .mappings
                    .push((Arc::downgrade(&mem), length));
                self.resume_owned(sid);
                ok(ReplyBody::U64(iova))
            }
            Request::IoasUnmap {
                ioas_id,
                iova,
                length,
            } => {
                self.session(sid)?
                    .require(ioas_id, &[Owned::Ioas], "IOAS")?;
                // Two-phase: the areas are gone now; the reply waits until
                // no device thread uses their translations, without holding
                // up the service.
                let (n, ticket) = iommu.ioas_unmap_begin(ioas_id, iova, length)?;
                self.defer(ticket);
                ok(ReplyBody::U64(n))
            }
            Request::IoasCopy {
                flags,
                dst_ioas_id,
                src_ioas_id,
                length,
                dst_iova,
                src_iova,
            } => {
                let perm = map_perm(flags)?;
                let s = self.session(sid)?;
                s.require(dst_ioas_id, &[Owned::Ioas], "IOAS")?;
                s.require(src_ioas_id, &[Owned::Ioas], "IOAS")?;
                let fixed = (flags & MAP_FIXED_IOVA != 0).then_some(dst_iova);
                let iova =
                    iommu.ioas_copy(dst_ioas_id, src_ioas_id, src_iova, length, fixed, perm)?;
                self.resume_owned(sid);
                ok(ReplyBody::U64(iova))
            }
            Request::IoasIovaRanges { ioas_id } => {
                self.session(sid)?
                    .require(ioas_id, &[Owned::Ioas], "IOAS")?;
                let r = iommu.ioas_iova_ranges(ioas_id)?;
                if r.ranges.len() > MAX_RANGES {
                    return Err(Fail::new(
                        libc::EMSGSIZE,
                        format!("{} ranges exceed the limit of {MAX_RANGES}", r.ranges.len()),
                    ));
                }
                ok(ReplyBody::Ranges {
                    alignment: r.alignment,
                    ranges: r.ranges.iter().map(|r| (r.start, r.last)).collect(),
                })
            }
            Request::IoasAllowIovas { ioas_id, ranges } => {
                self.session(sid)?
                    .require(ioas_id, &[Owned::Ioas], "IOAS")?;
                let ranges: Vec<IovaRange> =
                    ranges.iter().map(|(s, l)| IovaRange::new(*s, *l)).collect();
                iommu.ioas_allow_iovas(ioas_id, &ranges)?;
                ok(ReplyBody::Empty)
            }
            Request::DeviceList => {
                let mut labels = self.shared.dir.labels();
                labels.retain(|l| !l.is_empty() && l.len() <= MAX_LABEL);
                labels.truncate(MAX_DEVICES);
                ok(ReplyBody::Devices(labels))
            }
            Request::DeviceInfo { label } => {
                let (dev, dev_id) = self.device(&label)?;
                let hw: HwInfo = iommu
                    .hw_info(dev_id)
                    .unwrap_or_else(|_| dev.hw_info().clone());
                ok(ReplyBody::DeviceInfo(device_info(dev_id, &hw)))
            }
            Request::Attach {
                label,
                pasid,
                pt_id,
            } => {
                let (_, dev_id) = self.device(&label)?;
                let s = self.session(sid)?;
                s.require(pt_id, &[Owned::Ioas, Owned::Hwpt], "IOAS or HWPT")?;
                if let Some(p) = pasid {
                    if !s.pasids.contains(&(label.clone(), p)) {
                        return Err(Fail::new(
                            libc::EPERM,
                            format!("pasid {p} of {label:?} is not reserved by this session"),
                        ));
                    }
                }
                let key = (label, pasid);
                let replace = s.attachments.contains(&key);
                if !replace {
                    self.require_grant(sid, &key.0, "ATTACH")?;
                }
                if pasid.is_none() {
                    if let Some(rid) = self.shared.dir.rid_ownership(&key.0) {
                        let hwpt = self.take_rid(sid, &rid, dev_id, &key.0, pt_id, replace)?;
                        if !replace {
                            self.session(sid)?.attachments.push(key);
                        }
                        return ok(ReplyBody::Id(hwpt));
                    }
                }
                let hwpt = if replace {
                    let (hwpt, ticket) = iommu.replace_begin(dev_id, pasid, pt_id)?;
                    self.defer(ticket);
                    hwpt
                } else {
                    iommu.attach(dev_id, pasid, pt_id)?
                };
                if !replace {
                    self.session(sid)?.attachments.push(key);
                }
                ok(ReplyBody::Id(hwpt))
            }
            Request::Detach { label, pasid } => {
                let (_, dev_id) = self.device(&label)?;
                let key = (label, pasid);
                let s = self.session(sid)?;
                if let Some(pos) = s.attachments.iter().position(|k| *k == key) {
                    let ticket = match pasid
                        .is_none()
                        .then(|| self.shared.dir.rid_ownership(&key.0))
                    {
                        Some(Some(rid)) => self.give_back_rid(sid, &rid, dev_id, &key.0),
                        _ => Some(iommu.detach_begin(dev_id, pasid)?),
                    };
                    if let Some(t) = ticket {
                        self.defer(t);
                    }
                    self.session(sid)?.attachments.remove(pos);
                    ok(ReplyBody::Empty)
                } else if iommu.attached_hwpt(dev_id, pasid)?.is_some() {
                    Err(Fail::new(
                        libc::EPERM,
                        format!("{:?}/{pasid:?} was not attached by this session", key.0),
                    ))
                } else {
                    // iommufd: detaching what is not attached is a no-op.
                    ok(ReplyBody::Empty)
                }
            }
            Request::PasidAlloc { label } => {
                self.require_grant(sid, &label, "PASID_ALLOC")?;
                self.pasid_alloc(sid, label)
            }
            Request::RidToken { label } => self.rid_token(sid, &label),
            Request::RidClaim { label, token } => {
                self.device(&label)?;
                let rid = self.shared.dir.rid_ownership(&label).ok_or_else(|| {
                    Fail::new(
                        libc::EPERM,
                        format!("device {label:?} has no handover tokens"),
                    )
                })?;
                rid.redeem(sid, &token).map_err(|r| {
                    debug!("service: session {sid}: RID_CLAIM of {label:?} refused: {r}");
                    Fail::new(r.errno(), format!("{label:?}: {r}"))
                })?;
                log_limited!(
                    log::Level::Info,
                    "service: session {sid} redeemed a handover token of {label:?}"
                );
                ok(ReplyBody::Empty)
            }
            Request::PasidFree { label, pasid } => {
                let (_, dev_id) = self.device(&label)?;
                let key = (label, pasid);
                let s = self.session(sid)?;
                if !s.pasids.contains(&key) {
                    return Err(Fail::new(
                        libc::ENOENT,
                        format!(
                            "pasid {pasid} of {:?} is not reserved by this session",
                            key.0
                        ),
                    ));
                }
                let akey = (key.0.clone(), Some(pasid));
                if let Some(pos) = s.attachments.iter().position(|k| *k == akey) {
                    let t = iommu.detach_begin(dev_id, Some(pasid))?;
                    self.defer(t);
                    self.session(sid)?.attachments.remove(pos);
                }
                let info = {
                    let s = self.session(sid)?;
                    s.pasids.remove(&key);
                    s.info.clone()
                };
                self.shared.registry().pasids.remove(&key);
                if let Some(o) = self.shared.observer() {
                    o.pasid_released(&info, &key.0, pasid);
                }
                ok(ReplyBody::Empty)
            }
            Request::HwptAlloc {
                label,
                pt_id,
                flags,
                fault_id,
                data_type,
                data,
            } => {
                let (_, dev_id) = self.device(&label)?;
                self.require_grant(sid, &label, "HWPT_ALLOC")?;
                self.room_for_object(sid)?;
                let s = self.session(sid)?;
                s.require(pt_id, &[Owned::Ioas, Owned::Hwpt], "IOAS or HWPT")?;
                if let Some(f) = fault_id {
                    s.require(f, &[Owned::Fault], "fault queue")?;
                }
                let data = match data_type {
                    HWPT_DATA_NONE if data.is_empty() => HwptData::None,
                    HWPT_DATA_STAGE1 if data.len() == 8 => {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&data);
                        HwptData::Stage1 {
                            root: u64::from_le_bytes(w),
                        }
                    }
                    HWPT_DATA_NONE | HWPT_DATA_STAGE1 => {
                        return Err(Fail::new(
                            libc::EINVAL,
                            format!("data_len {} does not fit data_type {data_type}", data.len()),
                        ))
                    }
                    _ => {
                        return Err(Fail::new(
                            libc::EOPNOTSUPP,
                            format!("hwpt data_type {data_type}"),
                        ))
                    }
                };
                let id = iommu.hwpt_alloc(&HwptAlloc {
                    dev_id,
                    pt_id,
                    flags,
                    data,
                    fault_id,
                })?;
                self.add_object(sid, id, Owned::Hwpt)?;
                ok(ReplyBody::Id(id))
            }
            Request::HwptInvalidate {
                hwpt_id,
                data_type,
                entries,
                ..
            } => {
                self.session(sid)?
                    .require(hwpt_id, &[Owned::Hwpt], "HWPT")?;
                if data_type != INVALIDATE_DATA_STAGE1 && data_type != INVALIDATE_DATA_VIOMMU {
                    return Err(Fail::new(
                        libc::EINVAL,
                        format!("invalidation data_type {data_type}"),
                    ));
                }
                let (done, res, ticket) = iommu.hwpt_invalidate_begin(hwpt_id, &entries);
                self.defer(ticket);
                match res {
                    Ok(()) => Ok((ReplyBody::Empty, done, None)),
                    Err(e) => Err(Fail {
                        errno: e.errno(),
                        aux: done,
                        message: e.to_string(),
                    }),
                }
            }
            Request::FaultQueueAlloc => {
                self.room(sid, &object_cost(Owned::Fault), "FAULT_QUEUE_ALLOC")?;
                if self.session(sid)?.pumps.len() >= MAX_FAULT_QUEUES_PER_SESSION {
                    return Err(Fail::new(
                        libc::ENOSPC,
                        format!("session has {MAX_FAULT_QUEUES_PER_SESSION} fault queues"),
                    ));
                }
                let (server_end, client_end) =
                    fault_channel_pair().map_err(|e| Fail::new(errno_of(&e), e.to_string()))?;
                // Every group raised on the session's queues takes a slot of
                // its budget: one session that never answers holds at most
                // that many of a device's outstanding faults.
                let budget = self.session(sid)?.faults.clone();
                let (id, fq) = iommu.fault_queue_alloc()?;
                fq.set_budget(Some(budget));
                let pump = match FaultPump::new(QueueSource::new(fq), server_end) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = iommu.destroy(id);
                        return Err(Fail::new(errno_of(&e), e.to_string()));
                    }
                };
                let (src, chan) = pump_interest(false);
                let reg = self
                    .epoll
                    .add(
                        pump.source().queue().fd(),
                        EpollEvent::new(src, token(sid, id, KIND_SOURCE)),
                    )
                    .and_then(|_| {
                        self.epoll.add(
                            pump.socket(),
                            EpollEvent::new(chan, token(sid, id, KIND_CHANNEL)),
                        )
                    });
                if let Err(e) = reg {
                    let _ = self.epoll.delete(pump.source().queue().fd());
                    drop(pump);
                    let _ = iommu.destroy(id);
                    return Err(Fail::new(e as i32, "cannot watch the fault queue"));
                }
                self.add_object(sid, id, Owned::Fault)?;
                self.session(sid)?.pumps.insert(id, pump);
                Ok((ReplyBody::Id(id), 0, Some(client_end)))
            }
        }
    }

    fn session(&mut self, sid: u64) -> Result<&mut Session, Fail> {
        self.sessions
            .get_mut(&sid)
            .ok_or_else(|| Fail::new(libc::ENOENT, "session is gone"))
    }

    fn room_for_object(&mut self, sid: u64) -> Result<(), Fail> {
        self.room(sid, &object_cost(Owned::Ioas), "a new object")
    }

    /// Whether session `sid` may be charged `cost` without passing a
    /// limit; if not, mappings that are gone are released and it is asked
    /// again. A refusal is logged (rate-limited) and answered with the
    /// resource's errno.
    fn room(&mut self, sid: u64, cost: &[(Resource, u64)], what: &str) -> Result<(), Fail> {
        if self.fits(sid, cost)?.is_ok() {
            return Ok(());
        }
        {
            let mut l = self.shared.ledger();
            for sess in self.sessions.values_mut() {
                sess.sweep(&mut l);
            }
        }
        match self.fits(sid, cost)? {
            Ok(()) => Ok(()),
            Err(e) => {
                let peer = self.session(sid)?.info.peer();
                log_limited!(
                    limit: LIMIT_REFUSED,
                    log::Level::Warn,
                    "service: session {sid} ({peer}): {what} refused: {e}"
                );
                Err(Fail::new(e.resource.errno(), format!("{what}: {e}")))
            }
        }
    }

    /// The first limit `cost` would pass, if any.
    fn fits(&self, sid: u64, cost: &[(Resource, u64)]) -> Result<Result<(), Exceeded>, Fail> {
        let s = self
            .sessions
            .get(&sid)
            .ok_or_else(|| Fail::new(libc::ENOENT, "session is gone"))?;
        // Resources are counted apart: each may be checked on its own.
        let l = self.shared.ledger();
        for (r, n) in cost {
            if let Err(e) = l.check(s.info.uid, &s.usage, *r, *n) {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }

    /// Charges `cost` to session `sid` (after [`Service::room`] said it fits).
    fn charge(&mut self, sid: u64, cost: &[(Resource, u64)]) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut l = self.shared.ledger();
        for (r, n) in cost {
            if let Err(e) = l.charge(s.info.uid, &mut s.usage, *r, *n) {
                // Cannot happen: nothing was charged since `room`.
                warn!("service: session {sid}: charge after room: {e}");
            }
        }
    }

    /// Gives back `cost` charged to session `sid`.
    fn release(&mut self, sid: u64, cost: &[(Resource, u64)]) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut l = self.shared.ledger();
        for (r, n) in cost {
            l.release(s.info.uid, &mut s.usage, *r, *n);
        }
    }

    /// Records a new object of session `sid` and charges it.
    fn add_object(&mut self, sid: u64, id: u32, kind: Owned) -> Result<(), Fail> {
        self.session(sid)?.objects.push((id, kind));
        self.charge(sid, &object_cost(kind));
        Ok(())
    }

    fn destroy(&mut self, sid: u64, id: u32) -> Handled {
        let s = self.session(sid)?;
        let Some(pos) = s.objects.iter().position(|(i, _)| *i == id) else {
            return Err(Fail::new(
                libc::ENOENT,
                format!("no object with id {id} in this session"),
            ));
        };
        // A fault queue's channel is its fd: as in iommufd, the queue cannot
        // go while the client still holds its end (EBUSY). Once the client
        // closed it, the pump (which holds the service's handle on the
        // queue) is of no use: drop it, then destroy.
        if let Some(p) = s.pumps.get(&id) {
            if !p.consumer_closed() {
                return Err(Fail::new(
                    libc::EBUSY,
                    format!("fault queue {id}: its channel fd is still open; close it first"),
                ));
            }
        }
        if let Some(p) = s.pumps.remove(&id) {
            let _ = self.epoll.delete(p.source().queue().fd());
            let _ = self.epoll.delete(p.socket());
        }
        self.shared.iommu.destroy(id)?;
        let (_, kind) = self.session(sid)?.objects.remove(pos);
        self.release(sid, &object_cost(kind));
        Ok((ReplyBody::Empty, 0, None))
    }

    fn pasid_alloc(&mut self, sid: u64, label: String) -> Handled {
        let (dev, dev_id) = self.device(&label)?;
        if self.session(sid)?.pasids.len() >= MAX_PASIDS_PER_SESSION {
            return Err(Fail::new(
                libc::ENOSPC,
                format!("session holds {MAX_PASIDS_PER_SESSION} pasids"),
            ));
        }
        let bits = self
            .shared
            .iommu
            .hw_info(dev_id)
            .map(|h| h.max_pasid_log2)
            .unwrap_or_else(|_| dev.hw_info().max_pasid_log2);
        if bits == 0 {
            return Err(Fail::new(
                libc::EOPNOTSUPP,
                format!("device {label:?} has no PASID support"),
            ));
        }
        let limit = (1u64 << bits.min(20)).min(u64::from(MAX_PASID_SCAN)) as u32;
        let pasid = {
            let reg = self.shared.registry();
            (1..limit).find(|p| {
                !reg.pasids.contains_key(&(label.clone(), *p))
                    && matches!(self.shared.iommu.attached_hwpt(dev_id, Some(*p)), Ok(None))
            })
        };
        let Some(pasid) = pasid else {
            return Err(Fail::new(
                libc::ENOSPC,
                format!("no free pasid on {label:?}"),
            ));
        };
        self.shared
            .registry()
            .pasids
            .insert((label.clone(), pasid), sid);
        let info = {
            let s = self.session(sid)?;
            s.pasids.insert((label.clone(), pasid));
            s.info.clone()
        };
        if let Some(o) = self.shared.observer() {
            o.pasid_allocated(&info, &label, pasid);
        }
        Ok((ReplyBody::Id(pasid), 0, None))
    }
}

fn map_perm(flags: u32) -> Result<Perm, Fail> {
    let mut p = Perm::NONE;
    if flags & MAP_READABLE != 0 {
        p = p | Perm::READ;
    }
    if flags & MAP_WRITEABLE != 0 {
        p = p | Perm::WRITE;
    }
    if p.is_empty() {
        return Err(Fail::new(
            libc::EINVAL,
            "a mapping needs MAP_READABLE or MAP_WRITEABLE",
        ));
    }
    Ok(p)
}

/// The memfd must be sealed against shrinking: otherwise the client could
/// truncate it under a device's feet and the server would take SIGBUS.
fn check_sealed(fd: BorrowedFd<'_>) -> Result<(), Fail> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| {
        Fail::new(
            libc::EINVAL,
            format!("the fd is not a sealable memfd ({e})"),
        )
    })?;
    if SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
        Ok(())
    } else {
        Err(Fail::new(
            libc::EINVAL,
            "the memfd must carry F_SEAL_SHRINK",
        ))
    }
}

fn device_info(dev_id: u32, hw: &HwInfo) -> WireDeviceInfo {
    let mut flags = 0;
    if hw.nesting {
        flags |= INFO_NESTING;
    }
    if hw.iopf {
        flags |= INFO_IOPF;
    }
    if hw.dirty_tracking {
        flags |= INFO_DIRTY_TRACKING;
    }
    WireDeviceInfo {
        dev_id,
        max_pasid_log2: hw.max_pasid_log2,
        flags,
        page_sizes: hw.page_sizes,
        reserved: hw
            .reserved
            .iter()
            .take(MAX_RESERVED)
            .map(|r| (r.start, r.last))
            .collect(),
    }
}
