//! Fault and event queues in the context (iommufd's `eventq.c`): their
//! allocation, and the report of a translation failure on a HWPT without a
//! fault queue to the event queue that covers the device. The queues
//! themselves are `crate::fault` and `crate::event`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{no_such, CtxInner, EqEntry, Iommu, Object};
use crate::device::DeviceShared;
use crate::error::{Error, Result};
use crate::event::{EventInner, EventQueue, EventReason, EventRecord, MAX_EVENT_QUEUE_DEPTH};
use crate::fault::{FaultInner, FaultQueue};
use crate::types::*;

impl CtxInner {
    /// Device side: a translation failed on a HWPT without fault queue.
    pub(crate) fn report_event(
        &self,
        dev_id: DevId,
        shared: &Arc<DeviceShared>,
        pasid: Option<u32>,
        iova: u64,
        perm: Perm,
        reason: EventReason,
    ) {
        if self.event_queues.load(Ordering::Relaxed) == 0 {
            return;
        }
        let q = {
            let st = self.lock();
            let Ok(dev) = st.dev(dev_id) else { return };
            if !Arc::ptr_eq(&dev.shared, shared) {
                return;
            }
            let viommu = dev.vdevice.and_then(|v| st.vdev(v).ok()).map(|v| v.viommu);
            let mut ctx_q = None;
            let mut v_q = None;
            for o in st.objects.values() {
                if let Object::EventQueue(e) = o {
                    match e.viommu {
                        None => ctx_q = Some(e.inner.clone()),
                        Some(v) if Some(v) == viommu => v_q = Some(e.inner.clone()),
                        Some(_) => {}
                    }
                }
            }
            v_q.or(ctx_q)
        };
        let Some(q) = q else { return };
        let (vdev, vpasid) = {
            let v = shared.virt_read();
            (
                v.virt_id.unwrap_or(u64::from(dev_id)),
                pasid.map(|p| v.p2v.get(&p).copied().unwrap_or(p)),
            )
        };
        q.push(EventRecord {
            flags: 0,
            sequence: 0,
            dev_id: vdev,
            pasid: vpasid,
            addr: iova,
            perm,
            reason,
        });
    }
}

impl Iommu {
    /// `IOMMU_FAULT_QUEUE_ALLOC`.
    pub fn fault_queue_alloc(&self) -> Result<(FaultId, FaultQueue)> {
        let mut st = self.lock();
        let id = st.alloc_id()?;
        let q = FaultInner::open(id)?;
        st.objects.insert(id, Object::Fault(q.inner.clone()));
        Ok((id, q))
    }

    /// `IOMMU_VEVENTQ_ALLOC` on a vIOMMU, or (`None`) the context-wide queue
    /// for devices without one. Depth must be in `1..=1 << 19` (`EINVAL`);
    /// a second queue for the same scope → `EEXIST`.
    pub fn event_queue_alloc(
        &self,
        viommu: Option<ViommuId>,
        depth: u32,
    ) -> Result<(EventQueueId, EventQueue)> {
        let mut st = self.lock();
        if let Some(v) = viommu {
            if !matches!(st.objects.get(&v), Some(Object::Viommu(_))) {
                return Err(no_such("vIOMMU", v));
            }
        }
        if depth == 0 || depth > MAX_EVENT_QUEUE_DEPTH {
            return Err(Error::Invalid {
                what: "event queue depth must be in 1..=1 << 19",
            });
        }
        let exists = st
            .objects
            .values()
            .any(|o| matches!(o, Object::EventQueue(e) if e.viommu == viommu));
        if exists {
            return Err(Error::AlreadyExists {
                what: "an event queue for this scope",
            });
        }
        let id = st.alloc_id()?;
        let q = EventInner::open(id, depth)?;
        st.objects.insert(
            id,
            Object::EventQueue(EqEntry {
                inner: q.inner.clone(),
                viommu,
            }),
        );
        self.inner.event_queues.fetch_add(1, Ordering::Relaxed);
        Ok((id, q))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_setup as setup;
    use super::*;
    use crate::fault::{FaultStatus, PageResponseCode};

    #[test]
    fn test_fault_raise_and_respond() {
        let (iommu, dev, dev_id, ioas, mem) = setup();
        let (fid, q) = iommu.fault_queue_alloc().expect("fq");
        let hwpt = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id,
                pt_id: ioas,
                fault_id: Some(fid),
                ..Default::default()
            })
            .expect("hwpt");
        iommu.attach(dev_id, None, hwpt).expect("attach");
        let mut t = dev.translator();
        let mut b = [0u8; 8];
        let pending = match t.read(None, 0x5000, &mut b) {
            Err(Error::FaultRaised { pending, .. }) => pending,
            other => panic!("expected a fault, got {other:?}"),
        };
        assert_eq!(pending.status(), FaultStatus::Pending);
        let mut recs = Vec::new();
        assert_eq!(q.read_batch(&mut recs, 16), Ok(1));
        assert_eq!(recs[0].addr, 0x5000);
        assert_eq!(recs[0].dev_id, u64::from(dev_id));
        iommu
            .ioas_map(ioas, &mem, 0, 0x1000, Some(0x5000), Perm::READ)
            .expect("map");
        q.respond(recs[0].cookie, PageResponseCode::Success)
            .expect("respond");
        assert_eq!(pending.wait(), FaultStatus::Success);
        t.read(None, 0x5000, &mut b).expect("retry");
        assert_eq!(
            q.respond(recs[0].cookie, PageResponseCode::Success),
            Err(Error::UnknownCookie {
                cookie: recs[0].cookie
            })
        );
    }
}
