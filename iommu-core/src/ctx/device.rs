//! Devices in the context (iommufd's `device.c`): bind and unbind, and
//! attach, replace and detach of the RID or a PASID to an IOAS (through
//! its auto HWPT) or a HWPT, with the checks of what a device may attach
//! to. Leaving an IOAS records the device's open access sections there
//! (see `unlink_ioas`), the half of the unmap-safety protocol that
//! attachments own.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{device_slots, no_such, CtxInner, DevEntry, HwptEntry, Iommu, Object, State};
use crate::device::{pasid_key, Binding, DeviceShared, Domain, IommuDevice, NO_PASID};
use crate::error::{Error, Result};
use crate::fault::AutoAnswered;
use crate::ioas::{IoasInner, IoasState, ResvOwner};
use crate::sync::{invalidate_slots, lock, InvalidationTicket};
use crate::types::*;

/// What an attach or replace resolves `pt_id` to.
enum Target {
    Hwpt(HwptId),
    NewAuto(Arc<IoasInner>),
}

impl State {
    /// Resolves `pt_id` for an attach or replace and checks that the device
    /// may use it on `pasid`. `replacing` is the HWPT being replaced.
    fn resolve_target(&self, dev_id: DevId, pasid: Option<u32>, pt_id: ObjectId) -> Result<Target> {
        let dev = self.dev(dev_id)?;
        let key = pasid_key(pasid);
        let target = match self.objects.get(&pt_id) {
            Some(Object::Ioas(i)) => {
                if pasid.is_some() {
                    return Err(Error::Invalid {
                        what: "an IOAS cannot be attached to a PASID (auto domains are not PASID capable)",
                    });
                }
                // Reuse an auto domain of this IOAS, never a manual HWPT.
                let reuse = self.objects.iter().find_map(|(id, o)| match o {
                    Object::Hwpt(h) if h.auto && h.domain.s2.id == i.id => Some(*id),
                    _ => None,
                });
                match reuse {
                    Some(h) => Target::Hwpt(h),
                    None => Target::NewAuto(i.clone()),
                }
            }
            Some(Object::Hwpt(_)) => Target::Hwpt(pt_id),
            None | Some(Object::Tombstone) => return Err(no_such("IOAS or HWPT", pt_id)),
            Some(_) => {
                return Err(Error::WrongObjectType {
                    id: pt_id,
                    expected: "IOAS or HWPT",
                })
            }
        };
        let (flags, nested, fault) = match &target {
            Target::Hwpt(h) => {
                let h = self.hwpt(*h)?;
                (h.flags, h.nested.is_some(), h.domain.fault.is_some())
            }
            Target::NewAuto(_) => (0, false, false),
        };
        let info = &dev.shared.info;
        let pasid_ok = |id: &HwptId| {
            self.hwpt(*id)
                .map(|h| h.flags & IOMMU_HWPT_ALLOC_PASID != 0)
                .unwrap_or(false)
        };
        if let Some(p) = pasid {
            if info.max_pasid_log2 == 0 {
                return Err(Error::Invalid {
                    what: "the device has no PASID support",
                });
            }
            if u64::from(p) >= 1u64 << info.max_pasid_log2.min(32) {
                return Err(Error::Invalid {
                    what: "PASID beyond the device's PASID width",
                });
            }
            if flags & IOMMU_HWPT_ALLOC_PASID == 0 {
                return Err(Error::Invalid {
                    what: "the HWPT was not allocated with IOMMU_HWPT_ALLOC_PASID",
                });
            }
            if let Some(rid) = dev.attached.get(&NO_PASID) {
                if !pasid_ok(rid) {
                    return Err(Error::Invalid {
                        what: "the RID is attached to a HWPT that is not PASID capable",
                    });
                }
            }
        } else if flags & IOMMU_HWPT_ALLOC_PASID == 0 && dev.attached.keys().any(|k| *k != key) {
            return Err(Error::Invalid {
                what: "PASIDs are attached: the RID needs a PASID-capable HWPT",
            });
        }
        if flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0 && !info.dirty_tracking {
            return Err(Error::Invalid {
                what: "the device cannot use a dirty-tracking HWPT",
            });
        }
        if fault && !info.iopf {
            return Err(Error::Invalid {
                what: "the device cannot use a fault-capable HWPT",
            });
        }
        if nested && !info.nesting {
            return Err(Error::Invalid {
                what: "the device cannot use a nested HWPT",
            });
        }
        // A RID on a nested HWPT of a vIOMMU needs the device's vdevice on
        // that vIOMMU (iommufd: the driver's attach_dev asks
        // `iommufd_viommu_get_vdev_id`, ENOENT without one). PASIDs take
        // the driver's set_dev_pasid path, which does not ask.
        if let (Target::Hwpt(h), None) = (&target, pasid) {
            if let Some((_, Some(v))) = self.hwpt(*h)?.nested {
                let has = dev
                    .vdevice
                    .and_then(|vd| self.vdev(vd).ok())
                    .is_some_and(|vd| vd.viommu == v);
                if !has {
                    return Err(no_such("vdevice of this device on the vIOMMU", v));
                }
            }
        }
        Ok(target)
    }
}

/// Adds the device as a user of `s2` (alignment and, for the RID, its
/// reserved ranges).
fn link_ioas(s2: &IoasInner, dev_id: DevId, shared: &Arc<DeviceShared>, rid: bool) -> Result<()> {
    let mut st = s2.write();
    let page = shared.info.min_page_size();
    if page > st.alignment() {
        if let Some(r) = st.misaligned_area(page) {
            return Err(Error::AddressInUse {
                start: r.start,
                last: r.last,
            });
        }
    }
    if rid {
        st.reserve(&shared.info.reserved, ResvOwner::Device(dev_id))?;
    }
    st.users
        .entry(dev_id)
        .or_insert_with(|| (0, shared.clone()))
        .0 += 1;
    Ok(())
}

/// Undoes [`link_ioas`] for an attachment that was never published (a
/// failed install): no translator can have used it.
fn unlink_unpublished(s2: &IoasInner, dev_id: DevId, shared: &DeviceShared, rid: bool) {
    drop_user(&mut s2.write(), dev_id, shared, rid);
}

fn drop_user(st: &mut IoasState, dev_id: DevId, shared: &DeviceShared, rid: bool) {
    if rid {
        st.unreserve(&shared.info.reserved, ResvOwner::Device(dev_id));
    }
    if let Some(u) = st.users.get_mut(&dev_id) {
        u.0 = u.0.saturating_sub(1);
        if u.0 == 0 {
            st.users.remove(&dev_id);
        }
    }
}

/// Removes one attachment of the device from `s2`'s users, after the
/// device's attachment table stopped naming it. Under the IOAS lock, the
/// device's translators are invalidated and those inside an access section
/// are recorded as departed: an unmap of `s2` that runs before those
/// sections end waits for them, whoever waits on the returned ticket and
/// whenever. (Without the record, an unmap between this and the end of the
/// section would find no user and return while the section still held a
/// cached translation of the unmapped pages.)
fn unlink_ioas(
    s2: &IoasInner,
    dev_id: DevId,
    shared: &DeviceShared,
    rid: bool,
) -> InvalidationTicket {
    let mut st = s2.write();
    drop_user(&mut st, dev_id, shared, rid);
    if cfg!(ioasis_broken = "departed") {
        // Test-only build (`--cfg ioasis_broken="departed"`): the race this
        // record closes, kept so the models and tests can show they find it.
        drop(st);
        return invalidate_slots(&device_slots(shared));
    }
    st.departed.depart(&device_slots(shared))
}

impl CtxInner {
    /// Detaches one PASID key; the caller releases the lock, then finishes
    /// `answered` and hands out the ticket.
    fn detach_locked(
        st: &mut State,
        dev_id: DevId,
        key: u32,
        answered: &mut AutoAnswered,
    ) -> Result<InvalidationTicket> {
        let dev = st.dev_mut(dev_id)?;
        let Some(hwpt_id) = dev.attached.remove(&key) else {
            return Ok(InvalidationTicket::done());
        };
        let shared = dev.shared.clone();
        shared.attach_write().remove(&key);
        let (dom, auto) = match st.hwpt(hwpt_id) {
            Ok(h) => (h.domain.clone(), h.auto),
            Err(_) => return Ok(invalidate_slots(&device_slots(&shared))),
        };
        if let Some(q) = &dom.fault {
            answered.append(q.auto_respond(Some(&shared), Some(key)));
        }
        let ticket = unlink_ioas(&dom.s2, dev_id, &shared, key == NO_PASID);
        if auto && st.referenced(hwpt_id).is_none() {
            st.objects.remove(&hwpt_id);
        }
        Ok(ticket)
    }
}

impl Iommu {
    /// Binds a device (`VFIO_DEVICE_BIND_IOMMUFD`). A device bound anywhere
    /// already → [`Error::AlreadyBound`] (`EBUSY`).
    pub fn bind(&self, device: &IommuDevice) -> Result<DevId> {
        let mut st = self.lock();
        let shared = &device.shared;
        let mut b = lock(&shared.binding);
        if let Some(old) = b.as_ref() {
            if old.ctx.strong_count() > 0 {
                return Err(Error::AlreadyBound {
                    label: shared.label.to_string(),
                });
            }
        }
        let id = st.insert(Object::Device(DevEntry {
            shared: shared.clone(),
            attached: BTreeMap::new(),
            vdevice: None,
        }))?;
        *b = Some(Binding {
            ctx: Arc::downgrade(&self.inner),
            dev_id: id,
        });
        Ok(id)
    }

    /// Unbinds: detaches every PASID and the RID (waiting as
    /// [`Iommu::detach`] does), tombstones its vdevice, frees the id.
    pub fn unbind(&self, dev_id: DevId) -> Result<()> {
        self.unbind_begin(dev_id)?.wait();
        Ok(())
    }

    /// Two-phase [`Iommu::unbind`].
    pub fn unbind_begin(&self, dev_id: DevId) -> Result<InvalidationTicket> {
        let mut answered = AutoAnswered::default();
        let ticket = {
            let mut st = self.lock();
            let dev = st.dev(dev_id)?;
            let shared = dev.shared.clone();
            // PASIDs first, the RID last (the RID key sorts last).
            let keys: Vec<u32> = dev.attached.keys().copied().collect();
            let vdevice = dev.vdevice;
            let mut ticket = InvalidationTicket::done();
            for k in keys {
                // Cannot fail: the device was looked up above, under the
                // same lock. (A ticket must never be dropped under the lock.)
                if let Ok(t) = CtxInner::detach_locked(&mut st, dev_id, k, &mut answered) {
                    ticket.merge(t);
                }
            }
            if let Some(v) = vdevice {
                st.objects.insert(v, Object::Tombstone);
            }
            st.objects.remove(&dev_id);
            *lock(&shared.binding) = None;
            *shared.virt_write() = Default::default();
            ticket.merge(invalidate_slots(&device_slots(&shared)));
            ticket
        };
        answered.finish();
        Ok(ticket)
    }

    /// `IOMMU_GET_HW_INFO`.
    pub fn hw_info(&self, dev_id: DevId) -> Result<HwInfo> {
        Ok(self.lock().dev(dev_id)?.shared.info.clone())
    }

    /// Attaches `pt_id` (an IOAS: auto domain; or a HWPT) to the device's RID
    /// (`pasid = None`) or to a PASID; returns the HWPT id used. A RID or
    /// PASID already attached → `EBUSY` (use [`Iommu::replace`]).
    pub fn attach(&self, dev_id: DevId, pasid: Option<u32>, pt_id: ObjectId) -> Result<HwptId> {
        let mut st = self.lock();
        let key = pasid_key(pasid);
        if st.dev(dev_id)?.attached.contains_key(&key) {
            return Err(Error::Busy {
                id: dev_id,
                reason: "already attached: use replace",
            });
        }
        let target = st.resolve_target(dev_id, pasid, pt_id)?;
        self.install(&mut st, dev_id, key, target)
    }

    /// Links the device to the target's IOAS and publishes the domain.
    fn install(&self, st: &mut State, dev_id: DevId, key: u32, target: Target) -> Result<HwptId> {
        let shared = st.dev(dev_id)?.shared.clone();
        let (hwpt_id, domain) = match target {
            Target::Hwpt(h) => (h, st.hwpt(h)?.domain.clone()),
            Target::NewAuto(ioas) => {
                link_ioas(&ioas, dev_id, &shared, key == NO_PASID)?;
                let id = match st.alloc_id() {
                    Ok(id) => id,
                    Err(e) => {
                        unlink_unpublished(&ioas, dev_id, &shared, key == NO_PASID);
                        return Err(e);
                    }
                };
                let domain = Arc::new(Domain {
                    s2: ioas,
                    s1_root: None,
                    fault: None,
                    dirty: None,
                });
                st.objects.insert(
                    id,
                    Object::Hwpt(HwptEntry {
                        domain: domain.clone(),
                        nested: None,
                        auto: true,
                        flags: 0,
                        fault_id: None,
                    }),
                );
                st.dev_mut(dev_id)?.attached.insert(key, id);
                shared.attach_write().insert(key, domain);
                return Ok(id);
            }
        };
        link_ioas(&domain.s2, dev_id, &shared, key == NO_PASID)?;
        st.dev_mut(dev_id)?.attached.insert(key, hwpt_id);
        shared.attach_write().insert(key, domain);
        Ok(hwpt_id)
    }

    /// Replaces the attachment; returns once no translator uses the old one.
    pub fn replace(&self, dev_id: DevId, pasid: Option<u32>, pt_id: ObjectId) -> Result<HwptId> {
        let (id, t) = self.replace_begin(dev_id, pasid, pt_id)?;
        t.wait();
        Ok(id)
    }

    /// Two-phase [`Iommu::replace`]. Replacing with the current HWPT is a
    /// no-op; a failed replace keeps the old attachment; outstanding faults
    /// of the old attachment are answered INVALID; an auto HWPT left unused
    /// is destroyed.
    pub fn replace_begin(
        &self,
        dev_id: DevId,
        pasid: Option<u32>,
        pt_id: ObjectId,
    ) -> Result<(HwptId, InvalidationTicket)> {
        let mut answered = AutoAnswered::default();
        let out = {
            let mut st = self.lock();
            let key = pasid_key(pasid);
            let Some(&old_id) = st.dev(dev_id)?.attached.get(&key) else {
                return Err(Error::Invalid {
                    what: "replace of a RID or PASID that is not attached",
                });
            };
            let target = st.resolve_target(dev_id, pasid, pt_id)?;
            if let Target::Hwpt(h) = &target {
                if h == &old_id {
                    return Ok((old_id, InvalidationTicket::done()));
                }
            }
            let old = st.hwpt(old_id)?;
            let (old_dom, old_auto) = (old.domain.clone(), old.auto);
            let shared = st.dev(dev_id)?.shared.clone();
            // Install the new one (links its IOAS), then unlink the old.
            st.dev_mut(dev_id)?.attached.remove(&key);
            let new_id = match self.install(&mut st, dev_id, key, target) {
                Ok(id) => id,
                Err(e) => {
                    st.dev_mut(dev_id)?.attached.insert(key, old_id);
                    return Err(e);
                }
            };
            if let Some(q) = &old_dom.fault {
                answered.append(q.auto_respond(Some(&shared), Some(key)));
            }
            let ticket = unlink_ioas(&old_dom.s2, dev_id, &shared, key == NO_PASID);
            if old_auto && st.referenced(old_id).is_none() {
                st.objects.remove(&old_id);
            }
            (new_id, ticket)
        };
        answered.finish();
        Ok(out)
    }

    /// Detaches; returns once no translator uses the old attachment.
    /// Detaching what is not attached is a no-op.
    pub fn detach(&self, dev_id: DevId, pasid: Option<u32>) -> Result<()> {
        self.detach_begin(dev_id, pasid)?.wait();
        Ok(())
    }

    /// Two-phase [`Iommu::detach`].
    pub fn detach_begin(&self, dev_id: DevId, pasid: Option<u32>) -> Result<InvalidationTicket> {
        let mut answered = AutoAnswered::default();
        let t = {
            let mut st = self.lock();
            CtxInner::detach_locked(&mut st, dev_id, pasid_key(pasid), &mut answered)?
        };
        answered.finish();
        Ok(t)
    }

    /// The HWPT attached on the RID or a PASID, if any.
    pub fn attached_hwpt(&self, dev_id: DevId, pasid: Option<u32>) -> Result<Option<HwptId>> {
        Ok(self
            .lock()
            .dev(dev_id)?
            .attached
            .get(&pasid_key(pasid))
            .copied())
    }
}
