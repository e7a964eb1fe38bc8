//! Plain data types shared by the whole API: ids, permissions, ranges,
//! hardware info and the argument structs of HWPT allocation and
//! invalidation.

/// An object id: allocated from 1, at most 31 bits, one id space shared by
/// every object kind of a context (iommufd's xarray ids).
pub type ObjectId = u32;
/// Id of a bound device.
pub type DevId = u32;
/// Id of an IOAS.
pub type IoasId = u32;
/// Id of a HWPT (paging or nested).
pub type HwptId = u32;
/// Id of a fault queue object.
pub type FaultId = u32;
/// Id of a vIOMMU.
pub type ViommuId = u32;
/// Id of a vdevice object.
pub type VdeviceId = u32;
/// Id of an event queue object.
pub type EventQueueId = u32;

/// Access permission bits, encoded as in iommufd's fault records
/// (`IOMMU_PGFAULT_PERM_*`): READ = 1, WRITE = 2, EXEC = 4, PRIV = 8.
///
/// Mappings take only READ and WRITE; translations take READ and/or WRITE.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u32);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Read (device reads memory).
    pub const READ: Perm = Perm(1);
    /// Write (device writes memory).
    pub const WRITE: Perm = Perm(2);
    /// Read and write.
    pub const RW: Perm = Perm(3);
    /// Execute (fault records only).
    pub const EXEC: Perm = Perm(4);
    /// Privileged (fault records only).
    pub const PRIV: Perm = Perm(8);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Builds a value from raw bits, keeping unknown bits (validated where used).
    pub const fn from_bits_retain(bits: u32) -> Perm {
        Perm(bits)
    }
    /// True when every bit of `other` is set in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
    /// True when no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl std::fmt::Debug for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        for (bit, c) in [(1, 'r'), (2, 'w'), (4, 'x'), (8, 'p')] {
            if self.0 & bit != 0 {
                s.push(c);
            }
        }
        if self.0 & !0xf != 0 {
            s.push_str(&format!("+{:#x}", self.0 & !0xf));
        }
        if s.is_empty() {
            s.push('-');
        }
        write!(f, "Perm({s})")
    }
}

/// An inclusive IOVA range `[start, last]`, as iommufd reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// Builds `[start, last]`.
    pub const fn new(start: u64, last: u64) -> Self {
        IovaRange { start, last }
    }
    /// True when the two ranges share at least one address.
    pub const fn intersects(&self, other: &IovaRange) -> bool {
        self.start <= other.last && other.start <= self.last
    }
    /// True when `other` lies entirely inside `self`.
    pub const fn contains_range(&self, other: &IovaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }
}

/// The answer of [`Iommu::ioas_iova_ranges`](crate::Iommu::ioas_iova_ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IovaRanges {
    /// The usable holes: the complement of every reservation, ascending.
    pub ranges: Vec<IovaRange>,
    /// `out_iova_alignment`: the largest minimum page size of the attached
    /// devices (1 when none is attached).
    pub alignment: u64,
}

/// One area of an IOAS, for introspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaInfo {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
    /// Permissions of the area.
    pub perm: Perm,
    /// Offset into the backing [`Memory`](crate::Memory).
    pub mem_offset: u64,
}

/// 4 KiB: the smallest page size, the stage-1 page size and the granule of
/// the translation cache index.
pub const PAGE_SIZE: u64 = 4096;

/// Hardware information of a device, known at bind time
/// (`IOMMU_GET_HW_INFO` plus the device's reserved regions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwInfo {
    /// `out_max_pasid_log2`: PASID width in bits, 0 when the device has no
    /// PASID support. At most 20.
    pub max_pasid_log2: u8,
    /// Bitmap of supported IOMMU page sizes; the lowest set bit is the
    /// minimum page size and raises the IOAS alignment on attach.
    pub page_sizes: u64,
    /// The device can use nested (two-stage) translation and nest parents.
    pub nesting: bool,
    /// The device supports I/O page faults (PRI/IOPF).
    pub iopf: bool,
    /// The device supports dirty tracking (`IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub dirty_tracking: bool,
    /// Reserved IOVA ranges (e.g. an MSI window), excluded from any IOAS the
    /// device's RID is attached to.
    pub reserved: Vec<IovaRange>,
}

impl Default for HwInfo {
    /// No PASID, 4 KiB/2 MiB/1 GiB pages, no nesting, no IOPF, no dirty
    /// tracking, no reserved ranges.
    fn default() -> Self {
        HwInfo {
            max_pasid_log2: 0,
            page_sizes: (1 << 12) | (1 << 21) | (1 << 30),
            nesting: false,
            iopf: false,
            dirty_tracking: false,
            reserved: Vec::new(),
        }
    }
}

impl HwInfo {
    /// A capable device: 20-bit PASIDs, nesting, IOPF and dirty tracking.
    pub fn full() -> Self {
        HwInfo {
            max_pasid_log2: 20,
            nesting: true,
            iopf: true,
            dirty_tracking: true,
            ..HwInfo::default()
        }
    }
    /// The x86 MSI window `0xfee00000..=0xfeefffff`, a typical reserved range.
    pub const X86_MSI_WINDOW: IovaRange = IovaRange::new(0xfee0_0000, 0xfeef_ffff);

    /// The minimum page size (lowest bit of `page_sizes`), 4 KiB if empty.
    pub fn min_page_size(&self) -> u64 {
        if self.page_sizes == 0 {
            PAGE_SIZE
        } else {
            1u64 << self.page_sizes.trailing_zeros()
        }
    }
}

/// `IOMMU_HWPT_ALLOC_NEST_PARENT`: the paging HWPT may be a stage-2 parent.
pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: the HWPT supports dirty tracking.
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
/// `IOMMU_HWPT_FAULT_ID_VALID`: set implicitly when `fault_id` is given.
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = 1 << 2;
/// `IOMMU_HWPT_ALLOC_PASID`: the HWPT may be attached to PASIDs.
pub const IOMMU_HWPT_ALLOC_PASID: u32 = 1 << 3;

/// Driver data of a HWPT allocation (`data_type` + data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HwptData {
    /// `IOMMU_HWPT_DATA_NONE`: a paging HWPT built from an IOAS.
    #[default]
    None,
    /// A user-owned stage-1 table (see the crate docs for the format) whose
    /// root table lives at IOVA `root` of the parent's IOAS.
    Stage1 {
        /// IOVA (guest physical address) of the level-4 table, 4 KiB aligned.
        root: u64,
    },
}

/// Arguments of [`Iommu::hwpt_alloc`](crate::Iommu::hwpt_alloc)
/// (`IOMMU_HWPT_ALLOC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HwptAlloc {
    /// The device the HWPT is allocated for (its capabilities are checked).
    pub dev_id: DevId,
    /// An IOAS (paging HWPT), a nest-parent paging HWPT or a vIOMMU (nested).
    pub pt_id: ObjectId,
    /// `IOMMU_HWPT_ALLOC_*` flags.
    pub flags: u32,
    /// Driver data: `None` for paging, `Stage1` for nested.
    pub data: HwptData,
    /// Fault queue for I/O page faults (`FAULT_ID_VALID` + `fault_id`).
    pub fault_id: Option<FaultId>,
}

/// `IOMMU_VTD_INV_FLAGS_LEAF`-like flag: only leaf entries changed.
pub const IOMMU_INVALIDATE_FLAG_LEAF: u32 = 1;
/// Upper bound of entries in one invalidation call (iommufd's `1 << 19`).
pub const MAX_INVALIDATE_ENTRIES: usize = 1 << 19;

/// One entry of [`Iommu::hwpt_invalidate`](crate::Iommu::hwpt_invalidate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateEntry {
    /// Stage-1 IOTLB invalidation on a nested HWPT. `addr` is 4 KiB
    /// aligned, `npages` > 0; `addr = 0, npages = u64::MAX` means all.
    Stage1 {
        /// `IOMMU_INVALIDATE_FLAG_*` bits.
        flags: u32,
        /// First address (stage-1 input address).
        addr: u64,
        /// Number of 4 KiB pages.
        npages: u64,
    },
    /// vIOMMU-scoped invalidation in virtual ids: the vdevice's virtual id
    /// and optionally a virtual PASID, translated by the context.
    Viommu {
        /// Virtual device id (`virt_id` of a vdevice of this vIOMMU).
        vdev_id: u64,
        /// Virtual PASID, or `None` for the RID.
        vpasid: Option<u32>,
        /// `IOMMU_INVALIDATE_FLAG_*` bits.
        flags: u32,
        /// First address.
        addr: u64,
        /// Number of 4 KiB pages (`u64::MAX` with `addr` 0: all).
        npages: u64,
    },
}

/// Kind of an object, for introspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// An IOAS.
    Ioas,
    /// A bound device.
    Device,
    /// A paging HWPT (`auto` when created by an IOAS attach).
    HwptPaging {
        /// Created automatically by attaching an IOAS id.
        auto: bool,
    },
    /// A nested HWPT.
    HwptNested,
    /// A fault queue.
    FaultQueue,
    /// A vIOMMU.
    Viommu,
    /// A vdevice.
    Vdevice,
    /// An event queue.
    EventQueue,
}
