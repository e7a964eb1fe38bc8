//! The device's side of the control sockets ([`crate::control`]): HELLO
//! binds a client (its PASID checked, its portal and eventfds made and
//! sent), nothing else is a request, a closed connection tears the client
//! down.

use super::*;

pub(super) fn reply(conn: BorrowedFd<'_>, status: i32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut msg = Writer::default().i32(status).u32(0).0;
    msg.extend_from_slice(payload);
    if let Err(e) = proto::send(conn, &msg, fds) {
        debug!("reply failed: {e}");
    }
}

pub(super) fn hello(
    s: &Arc<Shared>,
    conn: BorrowedFd<'_>,
    h: &proto::Hello,
) -> Option<Arc<ClientCtx>> {
    let proto::Hello {
        priority: prio,
        session,
        pasid,
    } = *h;
    let uid = match check_pasid_owner(s, conn, session, pasid) {
        Ok(uid) => uid,
        Err(errno) => {
            reply(conn, -errno, &[], &[]);
            return None;
        }
    };
    // The administrator's priority for the uid; a client may only lower it.
    let priority = s.cfg.grant_priority(uid, prio);
    if s.clients.read().map_or(0, |c| c.len()) >= MAX_CLIENTS {
        reply(conn, -libc::EBUSY, &[], &[]);
        return None;
    }
    if s.cfg.wq_mode == WqMode::Dedicated
        && s.dedicated_in_use.fetch_add(1, Ordering::SeqCst) >= MAX_DEDICATED_WQS
    {
        s.dedicated_in_use.fetch_sub(1, Ordering::SeqCst);
        reply(conn, -libc::EBUSY, &[], &[]);
        return None;
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        ioasis::log_limited!(log::Level::Warn, "client setup: {what}: {e}");
        if s.cfg.wq_mode == WqMode::Dedicated {
            s.dedicated_in_use.fetch_sub(1, Ordering::SeqCst);
        }
        reply(conn, -libc::ENOMEM, &[], &[]);
    };
    let made = (|| -> std::io::Result<_> {
        let (portal, portal_fd) = Portal::create(s.cfg.wq_size)?;
        let completion_efd = shm::new_eventfd()?;
        let doorbell_efd = shm::new_eventfd()?;
        Ok((portal, portal_fd, completion_efd, doorbell_efd))
    })();
    let (portal, portal_fd, completion_efd, doorbell_efd) = match made {
        Ok(v) => v,
        Err(e) => {
            fail("resources", &e);
            return None;
        }
    };
    let client = Arc::new(ClientCtx {
        pasid,
        priority,
        slots: AtomicU64::new(0),
        faults: FaultBudget::new(s.cfg.faults_per_client),
        portal,
        completion_efd,
        doorbell_efd,
        dead: AtomicBool::new(false),
        inflight: AtomicU64::new(0),
        held: Mutex::new(VecDeque::new()),
        has_held: AtomicBool::new(false),
        ready: Mutex::new(VecDeque::new()),
        has_ready: AtomicBool::new(false),
        session,
        unbound: AtomicBool::new(false),
        parked_iommu: Mutex::new(Vec::new()),
        stats: ClientStats::default(),
    });
    let mut w = Writer::default()
        .u32(pasid)
        .u32(s.cfg.wq_mode.to_u32())
        .u32(s.cfg.wq_size)
        .u32(s.cfg.max_batch)
        .u32(s.cfg.max_xfer)
        .u32(DEV_ID);
    for word in s.limits.opcap.0 {
        w = w.u64(word);
    }
    w = w.u32(u32::from(priority));
    // Faults travel over the fault queue the client allocated from the
    // service, not over this socket.
    let fds = [
        portal_fd.as_fd(),
        shm::borrow_eventfd(&client.doorbell_efd),
        shm::borrow_eventfd(&client.completion_efd),
    ];
    reply(conn, 0, &w.0, &fds);
    // Publish the client to the workers (turns go round in list order).
    if let Ok(mut list) = s.clients.write() {
        let mut v: Vec<_> = list.iter().cloned().collect();
        v.push(client.clone());
        s.n_clients.store(v.len(), Ordering::Release);
        *list = Arc::new(v);
        s.clients_gen.fetch_add(1, Ordering::Release);
    }
    // Sleeping workers re-read the list (and so wait on this client's
    // doorbell too).
    shm::signal(&s.doorbell);
    ioasis::log_limited!(
        log::Level::Info,
        "client bound to PASID {pasid} (uid {uid}, priority {priority}, session {session})"
    );
    Some(client)
}

/// After HELLO the control socket carries no requests: memory is mapped
/// through the `/dev/iommu` service.
pub(super) fn handle_request(c: &ClientCtx, conn: BorrowedFd<'_>, pkt: &proto::Packet) {
    debug!(
        "PASID {}: request {:?} refused",
        c.pasid,
        Reader::new(&pkt.data).u32()
    );
    reply(conn, -libc::EINVAL, &[], &[]);
}

/// The device's side of the control sockets ([`crate::control`]): HELLO
/// binds a client, nothing else is a request, a closed connection tears
/// its client down.
pub(super) struct Portals(pub(super) Arc<Shared>);

impl control::Handler for Portals {
    type Client = Arc<ClientCtx>;

    fn hello(&self, conn: BorrowedFd<'_>, pkt: &proto::Packet) -> Option<Arc<ClientCtx>> {
        match proto::Hello::decode(&pkt.data, pkt.fds.len()) {
            Ok(h) => hello(&self.0, conn, &h),
            Err(errno) => {
                reply(conn, -errno, &[], &[]);
                None
            }
        }
    }

    fn request(&self, c: &Arc<ClientCtx>, conn: BorrowedFd<'_>, pkt: nix::Result<&proto::Packet>) {
        match pkt {
            Ok(p) => handle_request(c, conn, p),
            Err(e) => reply(conn, -(e as i32), &[], &[]),
        }
    }

    fn closed(&self, c: Arc<ClientCtx>) {
        teardown(&self.0, &c);
    }

    fn stopping(&self) -> bool {
        self.0.shutdown.load(Ordering::SeqCst)
    }
}

/// Drops a client whose control connection closed: stop taking its work,
/// abort what it has outstanding, wait for what is executing. Its service
/// session closing (usually at the same time) detaches the PASID and
/// destroys its IOAS.
pub(super) fn teardown(s: &Arc<Shared>, c: &Arc<ClientCtx>) {
    c.dead.store(true, Ordering::SeqCst);
    if let Ok(mut list) = s.clients.write() {
        let v: Vec<_> = list
            .iter()
            .filter(|x| !Arc::ptr_eq(x, c))
            .cloned()
            .collect();
        s.n_clients.store(v.len(), Ordering::Release);
        *list = Arc::new(v);
        s.clients_gen.fetch_add(1, Ordering::Release);
    }
    let n = abort_work(s, c);
    // Sleeping workers let go of the client (their copy of the list).
    shm::signal(&s.doorbell);
    if s.cfg.wq_mode == WqMode::Dedicated {
        s.dedicated_in_use.fetch_sub(1, Ordering::SeqCst);
    }
    ioasis::log_limited!(
        log::Level::Info,
        "PASID {}: client gone ({} descriptors, {} faults, {} aborted)",
        c.pasid,
        c.stats.completed.load(Ordering::Relaxed),
        c.stats.faults_raised.load(Ordering::Relaxed),
        n.aborted
    );
}
