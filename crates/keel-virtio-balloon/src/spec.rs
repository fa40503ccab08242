//! What virtio 1.2 section 5.5 defines for the balloon, and the statistics tags Linux added
//! since (include/uapi/linux/virtio_balloon.h). virtio-bindings has no balloon header, so
//! the values are written here, each with its section.

/// Feature bits (section 5.5.3).
pub mod feature {
    /// VIRTIO_BALLOON_F_MUST_TELL_HOST: the driver tells the host before reusing
    /// deflated pages.
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    /// VIRTIO_BALLOON_F_STATS_VQ: a statistics virtqueue is present.
    pub const STATS_VQ: u64 = 1 << 1;
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may deflate when it runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    /// VIRTIO_BALLOON_F_FREE_PAGE_HINT: free page hinting (not offered by this device).
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    /// VIRTIO_BALLOON_F_PAGE_POISON: the driver reports the value it poisons free pages with.
    pub const PAGE_POISON: u64 = 1 << 4;
    /// VIRTIO_BALLOON_F_PAGE_REPORTING (free page reporting): the reporting virtqueue is
    /// present.
    pub const PAGE_REPORTING: u64 = 1 << 5;
}

/// Offsets in `struct virtio_balloon_config` (section 5.5.4), all le32.
pub mod config {
    /// `num_pages`: the target, in 4 KiB pages (device-written).
    pub const NUM_PAGES: u64 = 0;
    /// `actual`: pages in the balloon (driver-written).
    pub const ACTUAL: u64 = 4;
    /// `free_page_hint_cmd_id` (read-only here: free page hinting is not offered).
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 8;
    /// `poison_val` (driver-written with VIRTIO_BALLOON_F_PAGE_POISON).
    pub const POISON_VAL: u64 = 12;
    /// Size of the structure.
    pub const SIZE: usize = 16;
}

/// The balloon's page: PFNs in the inflate and deflate queues count 4 KiB pages whatever
/// the host's or the guest's page size (section 5.5.6, VIRTIO_BALLOON_PFN_SHIFT).
pub const PFN_SHIFT: u32 = 12;
/// [`PFN_SHIFT`] as a size.
pub const BALLOON_PAGE: u64 = 1 << PFN_SHIFT;

/// Size of one `struct virtio_balloon_stat` (le16 tag, le64 val; packed, section 5.5.6.3).
pub const STAT_SIZE: usize = 10;
