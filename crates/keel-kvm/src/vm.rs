//! The VM: capabilities, memory slots, irqchip, irqfd/ioeventfd, GSI routes.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_msi, kvm_pit_config, kvm_userspace_memory_region,
    CpuId, KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use keel_bus::interrupt::MsiMessage;

use crate::vcpu::Vcpu;

/// Errors from VM operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM's API version is not the stable one (12).
    #[error("KVM API version {0} is not supported (expected 12)")]
    ApiVersion(i32),
    /// The host KVM lacks capabilities Keel needs.
    #[error("KVM lacks required capabilities: {}", .0.join(", "))]
    MissingCapabilities(Vec<&'static str>),
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A memory slot index is unknown.
    #[error("no memory slot {0}")]
    NoSuchSlot(u32),
    /// A GSI is outside the routing table or already used.
    #[error("GSI {0} is invalid or already routed")]
    BadGsi(u32),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The GSI routing table could not be built (more routes than KVM takes).
    #[error("cannot build a GSI routing table of {entries} entries")]
    RoutingTable {
        /// Entries the table would have held.
        entries: usize,
        /// vmm-sys-util's error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
}

/// Result alias for VM operations.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl { op, source }
}

/// Checks [`REQUIRED_CAPS`] with `has`; the error names every missing one.
fn check_capabilities(has: impl Fn(Cap) -> bool) -> Result<()> {
    let missing: Vec<&'static str> = REQUIRED_CAPS
        .iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|&(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingCapabilities(missing))
    }
}

/// The capabilities [`Vm::new`] checks for, with the names used in its error.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// One registered memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Whether KVM logs dirty pages for it.
    pub dirty_log: bool,
}

/// Whether KVM logs the pages the guest writes in a memory slot (`KVM_MEM_LOG_DIRTY_PAGES`).
///
/// KVM sees only writes made by the guest's vCPUs. Writes the VMM makes through vm-memory
/// (device emulation) are tracked by the memory's own bitmap, when it has one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DirtyLog {
    /// No logging (the default): the cheapest for the guest.
    #[default]
    Off,
    /// Log every page the guest writes; read and clear the log with [`Vm::dirty_log`] or
    /// [`Vm::dirty_pages`].
    On,
}

pub use keel_bus::interrupt::{DataMatch, IoEventAddress as IoEventAddr};

/// The in-kernel IOAPIC's pins, GSIs `0..IOAPIC_PINS` (MSI routes use the ones above), and
/// the pins [`Vm::setup_split_irqchip`] reserves for a userspace IOAPIC.
pub const IOAPIC_PINS: u32 = kvm_bindings::KVM_IOAPIC_NUM_PINS;
/// The highest GSI KVM routes (`KVM_MAX_IRQ_ROUTES` - 1).
const MAX_GSI: u32 = kvm_bindings::KVM_MAX_IRQ_ROUTES as u32 - 1;

/// Where the VM's interrupt controllers live.
///
/// Either way the local APICs are KVM's. The choice matters most for how long the VM takes
/// to close: KVM tears an in-kernel PIC, IOAPIC and PIT down through RCU grace periods
/// (about 20 ms on the hosts Keel is developed on), the split irqchip in about 0.2 ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IrqchipMode {
    /// KVM's PIC, IOAPIC and PIT (`KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`): GSIs 0-23 are
    /// their pins, `KVM_IRQ_LINE` and irqfds drive them.
    #[default]
    Kernel,
    /// `KVM_CAP_SPLIT_IRQCHIP`: the VMM models the IOAPIC, PIC and PIT (keel-irqchip does)
    /// and keeps an MSI route on each of GSIs 0-23 for the IOAPIC pin of that number
    /// ([`Vm::set_msi_route`]); KVM reports the guest's EOIs of level-triggered vectors
    /// on those routes as `KVM_EXIT_IOAPIC_EOI`.
    Split,
}

#[derive(Default)]
struct State {
    mode: Option<IrqchipMode>,
    slots: Vec<MemorySlot>,
    /// MSI routes by GSI; IOAPIC/PIC routes are fixed and added on every commit.
    msi_routes: BTreeMap<u32, MsiMessage>,
    /// Clones of the registered guest memory (sharing its mappings), kept so that every
    /// mapping stays valid for as long as KVM may access it.
    memory: Vec<Box<dyn Send>>,
}

/// A KVM virtual machine.
///
/// Shared between threads as `Arc<Vm>`; every method takes `&self`.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    state: Mutex<State>,
    /// `KVM_GET_SUPPORTED_CPUID`, fetched once: it costs about 0.5 ms per call.
    supported_cpuid: OnceLock<CpuId>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").finish_non_exhaustive()
    }
}

impl Vm {
    /// Opens `/dev/kvm`, checks every capability in [`REQUIRED_CAPS`] (the error names each
    /// missing one) and creates a VM.
    ///
    /// # Examples
    ///
    /// A VM with 64 MiB of RAM, an in-kernel irqchip and one vCPU; memory goes in before
    /// the irqchip, the faster order.
    ///
    /// ```no_run
    /// use keel_kvm::{DirtyLog, Vm};
    /// use keel_memory::{x86, MemoryLayout, MemoryOptions, MIB};
    /// use vm_memory::GuestAddress;
    ///
    /// let layout = MemoryLayout::new(64 * MIB)?;
    /// let mem = layout.create_guest_memory(&MemoryOptions::default())?;
    /// let vm = Vm::new()?;
    /// vm.register_memory(&mem, DirtyLog::Off)?;
    /// vm.set_identity_map_address(GuestAddress(x86::IDENTITY_MAP_START))?;
    /// vm.set_tss_address(GuestAddress(x86::TSS_START))?;
    /// vm.setup_irqchip()?;
    /// let vcpu = vm.create_vcpu(0)?;
    /// vcpu.configure(&vm, 1, true)?;
    /// assert_eq!(vm.memory_slots().len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion(api));
        }
        check_capabilities(|cap| kvm.check_extension(cap))?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        Ok(Vm {
            kvm,
            fd,
            state: Mutex::new(State::default()),
            supported_cpuid: OnceLock::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The system-level KVM handle (supported CPUID, MSR lists, ...).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The CPUID entries KVM supports on this host (fetched once per VM, then cached).
    pub fn supported_cpuid(&self) -> Result<CpuId> {
        if let Some(c) = self.supported_cpuid.get() {
            return Ok(c.clone());
        }
        let c = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(self.supported_cpuid.get_or_init(|| c).clone())
    }

    /// The raw VM file descriptor, for operations this wrapper does not cover.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a memory slot, with KVM's dirty log as `log` says.
    ///
    /// Memory may be registered at any point KVM allows, but registering it before
    /// [`Vm::setup_irqchip`] is the faster order: VM start-up measured about 6 ms shorter
    /// that way on the hosts Keel is developed on, so keel-vmm registers memory first.
    ///
    /// The VM keeps a clone of `mem` (sharing its mappings), so they stay valid for as long
    /// as KVM can reach them, whatever the caller does with its own handle.
    pub fn register_memory<B>(&self, mem: &GuestMemoryMmap<B>, log: DirtyLog) -> Result<()>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mut st = self.state();
        let (flags, dirty_log) = match log {
            DirtyLog::Off => (0, false),
            DirtyLog::On => (KVM_MEM_LOG_DIRTY_PAGES, true),
        };
        for region in mem.iter() {
            let slot = st.slots.len() as u32;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .expect("offset 0 lies in every region");
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, and a clone of `mem`
            // (sharing the same mappings) is stored in the VM below, so the mapping outlives
            // the memory slot.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
            st.slots.push(MemorySlot {
                slot,
                guest_addr: desc.guest_phys_addr,
                size: desc.memory_size,
                dirty_log,
            });
        }
        st.memory.push(Box::new(mem.clone()));
        Ok(())
    }

    /// The registered memory slots.
    pub fn memory_slots(&self) -> Vec<MemorySlot> {
        self.state().slots.clone()
    }

    /// Places KVM's identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`): one page of guest
    /// physical address space that must not be RAM or a device. Intel hosts need it for
    /// guests that run unpaged; call it before creating vCPUs.
    pub fn set_identity_map_address(&self, addr: GuestAddress) -> Result<()> {
        self.fd
            .set_identity_map_address(addr.0)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))
    }

    /// Places KVM's TSS (`KVM_SET_TSS_ADDR`): three pages of guest physical address space
    /// that must not be RAM or a device. Intel hosts need it for real-mode guests; call it
    /// before running vCPUs.
    pub fn set_tss_address(&self, addr: GuestAddress) -> Result<()> {
        // keel-kvm is x86_64-only: usize is 64 bits wide.
        self.fd
            .set_tss_address(addr.0 as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))
    }

    /// Creates the in-kernel irqchip (PIC, IOAPIC, LAPICs) and the PIT, and installs the
    /// default GSI routes.
    ///
    /// Register guest memory first if you can (see [`Vm::register_memory`]): it is the
    /// faster order.
    pub fn setup_irqchip(&self) -> Result<()> {
        self.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let mut st = self.state();
        st.mode = Some(IrqchipMode::Kernel);
        self.commit_routes(&st)
    }

    /// Enables the split irqchip ([`IrqchipMode::Split`]) for an IOAPIC of 24 pins, the
    /// usual one: [`Vm::setup_split_irqchip_with_pins`] with [`IOAPIC_PINS`].
    pub fn setup_split_irqchip(&self) -> Result<()> {
        self.setup_split_irqchip_with_pins(IOAPIC_PINS)
    }

    /// Enables the split irqchip: KVM models the local APICs, and GSIs `0..pins` are
    /// reserved for the VMM's IOAPIC pins (KVM scans their MSI routes for level-triggered
    /// vectors, whose EOIs it reports as `KVM_EXIT_IOAPIC_EOI`). Call it before creating
    /// vCPUs.
    ///
    /// Register guest memory first if you can (see [`Vm::register_memory`]).
    pub fn setup_split_irqchip_with_pins(&self, pins: u32) -> Result<()> {
        if !self.kvm.check_extension(Cap::SplitIrqchip) {
            return Err(Error::MissingCapabilities(vec!["KVM_CAP_SPLIT_IRQCHIP"]));
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = u64::from(pins);
        self.fd
            .enable_cap(&cap)
            .map_err(ioctl("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
        let mut st = self.state();
        st.mode = Some(IrqchipMode::Split);
        // KVM starts the split irqchip with an empty table; committing one costs an SRCU
        // synchronisation, so only routes made before this call are worth it.
        if st.msi_routes.is_empty() {
            return Ok(());
        }
        self.commit_routes(&st)
    }

    /// Sets up the interrupt controllers `mode` says: [`Vm::setup_irqchip`] or
    /// [`Vm::setup_split_irqchip`].
    pub fn setup_irqchip_mode(&self, mode: IrqchipMode) -> Result<()> {
        match mode {
            IrqchipMode::Kernel => self.setup_irqchip(),
            IrqchipMode::Split => self.setup_split_irqchip(),
        }
    }

    /// The interrupt controllers set up, if any yet.
    pub fn irqchip_mode(&self) -> Option<IrqchipMode> {
        self.state().mode
    }

    /// The lowest GSI an MSI route may take: above the in-kernel IOAPIC's pins, or any
    /// with the split irqchip (whose IOAPIC pins are MSI routes).
    fn first_msi_gsi(st: &State) -> u32 {
        match st.mode {
            Some(IrqchipMode::Split) => 0,
            _ => IOAPIC_PINS,
        }
    }

    fn commit_routes(&self, st: &State) -> Result<()> {
        let mut entries = Vec::with_capacity(40 + st.msi_routes.len());
        let chip = |gsi: u32, irqchip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = irqchip;
            e.u.irqchip.pin = pin;
            e
        };
        // KVM's default routing: ISA IRQs 0-15 reach both PICs and the IOAPIC, 16-23 the
        // IOAPIC only. Setting a table replaces the default, so it is rebuilt here. The
        // split irqchip has no in-kernel pins to route to.
        let chip_pins = match st.mode {
            Some(IrqchipMode::Split) => 0,
            _ => IOAPIC_PINS,
        };
        for gsi in 0..chip_pins {
            if gsi < 8 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, msg) in &st.msi_routes {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|source| Error::RoutingTable {
                entries: entries.len(),
                source,
            })?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(ioctl("KVM_SET_GSI_ROUTING"))
    }

    /// Routes `gsi` to an MSI with `msg`: a GSI above the in-kernel IOAPIC's pins, or any
    /// with the split irqchip.
    pub fn add_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<()> {
        let mut st = self.state();
        if !(Self::first_msi_gsi(&st)..=MAX_GSI).contains(&gsi) || st.msi_routes.contains_key(&gsi)
        {
            return Err(Error::BadGsi(gsi));
        }
        st.msi_routes.insert(gsi, msg);
        self.commit_routes(&st).inspect_err(|_| {
            st.msi_routes.remove(&gsi);
        })
    }

    /// Changes the message of an existing MSI route.
    pub fn update_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<()> {
        let mut st = self.state();
        let old = *st.msi_routes.get(&gsi).ok_or(Error::BadGsi(gsi))?;
        if old == msg {
            return Ok(());
        }
        st.msi_routes.insert(gsi, msg);
        self.commit_routes(&st).inspect_err(|_| {
            st.msi_routes.insert(gsi, old);
        })
    }

    /// Makes `gsi` an MSI route with `msg`, or no route with `None`, whichever it was
    /// before: how a userspace IOAPIC keeps its pins' routes (see [`IrqchipMode::Split`]).
    /// Commits the table only when something changed.
    pub fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<()> {
        let mut st = self.state();
        if !(Self::first_msi_gsi(&st)..=MAX_GSI).contains(&gsi) {
            return Err(Error::BadGsi(gsi));
        }
        let old = st.msi_routes.get(&gsi).copied();
        if old == msg {
            return Ok(());
        }
        match msg {
            Some(m) => st.msi_routes.insert(gsi, m),
            None => st.msi_routes.remove(&gsi),
        };
        self.commit_routes(&st).inspect_err(|_| {
            match old {
                Some(m) => st.msi_routes.insert(gsi, m),
                None => st.msi_routes.remove(&gsi),
            };
        })
    }

    /// Removes an MSI route.
    pub fn remove_msi_route(&self, gsi: u32) -> Result<()> {
        let mut st = self.state();
        let old = st.msi_routes.remove(&gsi).ok_or(Error::BadGsi(gsi))?;
        self.commit_routes(&st).inspect_err(|_| {
            st.msi_routes.insert(gsi, old);
        })
    }

    /// Injects one MSI directly (`KVM_SIGNAL_MSI`), with no route.
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.fd
            .signal_msi(msi)
            .map(drop)
            .map_err(ioctl("KVM_SIGNAL_MSI"))
    }

    /// Sets the level of an IOAPIC/PIC input (`KVM_IRQ_LINE`).
    pub fn set_irq_line(&self, gsi: u32, high: bool) -> Result<()> {
        self.fd
            .set_irq_line(gsi, high)
            .map_err(ioctl("KVM_IRQ_LINE"))
    }

    /// Makes a write to `evt` raise `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    /// Makes a write to `evt` assert `gsi`, a level-triggered in-kernel IOAPIC pin, until
    /// the guest's EOI: KVM then deasserts it and signals `resample`, so that the device
    /// can assert it again if its condition still holds. Only with
    /// [`IrqchipMode::Kernel`]: KVM refuses resampling irqfds on the split irqchip, whose
    /// IOAPIC does the same in userspace (keel-irqchip re-delivers on the EOI).
    pub fn register_irqfd_with_resample(
        &self,
        evt: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<()> {
        self.fd
            .register_irqfd_with_resample(evt, resample, gsi)
            .map_err(ioctl("KVM_IRQFD (resample)"))
    }

    /// Undoes [`Vm::register_irqfd`] and [`Vm::register_irqfd_with_resample`].
    pub fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(evt, gsi)
            .map_err(ioctl("KVM_IRQFD (deassign)"))
    }

    /// Makes guest writes matching `addr` and `data` signal `evt` inside KVM, with no exit to
    /// userspace.
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: IoEventAddr,
        data: DataMatch,
    ) -> Result<()> {
        self.ioevent(evt, addr, data, true)
            .map_err(ioctl("KVM_IOEVENTFD"))
    }

    /// Undoes [`Vm::register_ioevent`]; `addr` and `data` must match the registration.
    pub fn unregister_ioevent(
        &self,
        evt: &EventFd,
        addr: IoEventAddr,
        data: DataMatch,
    ) -> Result<()> {
        self.ioevent(evt, addr, data, false)
            .map_err(ioctl("KVM_IOEVENTFD (deassign)"))
    }

    fn ioevent(
        &self,
        evt: &EventFd,
        addr: IoEventAddr,
        data: DataMatch,
        assign: bool,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        fn go<T: Into<u64>>(
            fd: &VmFd,
            evt: &EventFd,
            a: &IoEventAddress,
            v: T,
            assign: bool,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            if assign {
                fd.register_ioevent(evt, a, v)
            } else {
                fd.unregister_ioevent(evt, a, v)
            }
        }
        let a = match addr {
            IoEventAddr::Pio(p) => IoEventAddress::Pio(p),
            IoEventAddr::Mmio(m) => IoEventAddress::Mmio(m),
        };
        match data {
            DataMatch::Any => go(&self.fd, evt, &a, NoDatamatch, assign),
            DataMatch::U8(v) => go(&self.fd, evt, &a, v, assign),
            DataMatch::U16(v) => go(&self.fd, evt, &a, v, assign),
            DataMatch::U32(v) => go(&self.fd, evt, &a, v, assign),
            DataMatch::U64(v) => go(&self.fd, evt, &a, v, assign),
        }
    }

    /// Reads and clears the dirty bitmap of `slot` (registered with dirty logging): one bit
    /// per 4 KiB page, bit `n` of word `w` for page `w * 64 + n`.
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>> {
        let s = self
            .state()
            .slots
            .iter()
            .copied()
            .find(|s| s.slot == slot)
            .ok_or(Error::NoSuchSlot(slot))?;
        self.fd
            .get_dirty_log(slot, s.size as usize)
            .map_err(ioctl("KVM_GET_DIRTY_LOG"))
    }

    /// The guest physical addresses of every page dirtied since the last call, over all
    /// slots registered with dirty logging.
    pub fn dirty_pages(&self) -> Result<Vec<GuestAddress>> {
        let mut pages = Vec::new();
        for s in self.memory_slots().into_iter().filter(|s| s.dirty_log) {
            for (w, word) in self.dirty_log(s.slot)?.into_iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let n = bits.trailing_zeros() as u64;
                    pages.push(GuestAddress(s.guest_addr + (w as u64 * 64 + n) * 4096));
                    bits &= bits - 1;
                }
            }
        }
        Ok(pages)
    }

    /// Creates vCPU `id` (its APIC ID). Configure it with the `Vcpu` set-up methods.
    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        Ok(Vcpu::new(fd, id))
    }

    /// A new eventfd suitable for irqfd and ioeventfd use (non-blocking).
    pub fn new_eventfd() -> Result<EventFd> {
        EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_each_named() {
        assert!(check_capabilities(|_| true).is_ok());
        let e = check_capabilities(|c| !matches!(c, Cap::Irqfd | Cap::SignalMsi)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "KVM lacks required capabilities: KVM_CAP_IRQFD, KVM_CAP_SIGNAL_MSI"
        );
    }
}
