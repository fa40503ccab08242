//! Host CPU sets for a device's worker threads (and any other thread of a VMM): the list
//! syntax of `taskset -c` and cpusets, ranges and commas (`1`, `0-3`, `0,2-3`; no
//! strides), parsed, checked against the CPUs the process was started on, and applied
//! to a thread with `sched_setaffinity(2)`.
//!
//! Where a worker runs matters on small hosts: a worker that shares its CPU with a vCPU
//! thread waits for it, and a vCPU that takes the host disk's completion interrupts
//! leaves guest mode for each. Keeping them apart is the operator's choice, so these are
//! options, never defaults.
//!
//! # Examples
//!
//! ```
//! use keel_virtio::affinity::CpuSet;
//!
//! let set: CpuSet = "0,2-3".parse().unwrap();
//! assert_eq!(set.cpus().collect::<Vec<_>>(), [0, 2, 3]);
//! assert_eq!(set.to_string(), "0,2-3");
//! assert!("3-1".parse::<CpuSet>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

/// CPUs a [`CpuSet`] can name: `0..MAX_CPUS` (the size of glibc's `cpu_set_t`).
pub const MAX_CPUS: usize = 1024;

const WORDS: usize = MAX_CPUS / 64;

/// A non-empty set of host CPUs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuSet {
    bits: [u64; WORDS],
}

/// Errors from parsing or applying a [`CpuSet`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AffinityError {
    /// The text is not a CPU list.
    #[error("{0:?}: expected host CPUs as a list such as 1, 0-3 or 0,2-3")]
    Syntax(String),
    /// A CPU number is `MAX_CPUS` or more.
    #[error("CPU {0}: CPUs are numbered below {MAX_CPUS}")]
    TooLarge(String),
    /// The set names CPUs outside those the calling thread may run on: absent, offline,
    /// or left out by whoever started the process (its `taskset`, its cgroup). Such a set
    /// is refused rather than widened past the launcher's choice.
    #[error("CPUs {wanted} are not all usable here: this process may run on {allowed}")]
    NotAllowed {
        /// The set asked for.
        wanted: Box<CpuSet>,
        /// The CPUs the process may run on.
        allowed: Box<CpuSet>,
    },
    /// `sched_getaffinity` or `sched_setaffinity` failed.
    #[error("{step} failed")]
    Sched {
        /// Which call.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl CpuSet {
    /// The set holding CPU `cpu` alone (`None` past [`MAX_CPUS`]).
    pub fn single(cpu: usize) -> Option<CpuSet> {
        let mut s = CpuSet { bits: [0; WORDS] };
        s.insert(cpu).then_some(s)
    }

    fn insert(&mut self, cpu: usize) -> bool {
        if cpu >= MAX_CPUS {
            return false;
        }
        self.bits[cpu / 64] |= 1 << (cpu % 64);
        true
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        cpu < MAX_CPUS && self.bits[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    /// The CPUs of the set, in ascending order.
    pub fn cpus(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_CPUS).filter(|&c| self.contains(c))
    }

    /// Whether every CPU of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.bits.iter().zip(&other.bits).all(|(a, b)| a & !b == 0)
    }

    /// The CPUs the calling thread may run on now (`sched_getaffinity`).
    pub fn allowed() -> Result<CpuSet, AffinityError> {
        // SAFETY: an all-zero cpu_set_t is an empty set.
        let mut raw: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `raw` is a cpu_set_t of the size passed; the kernel writes into it only.
        let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut raw) };
        if rc != 0 {
            return Err(AffinityError::Sched {
                step: "sched_getaffinity",
                source: std::io::Error::last_os_error(),
            });
        }
        let mut s = CpuSet { bits: [0; WORDS] };
        for cpu in 0..MAX_CPUS {
            // SAFETY: CPU_ISSET reads bit `cpu` of `raw`, which holds MAX_CPUS bits.
            if unsafe { libc::CPU_ISSET(cpu, &raw) } {
                s.insert(cpu);
            }
        }
        Ok(s)
    }

    /// Checks that every CPU of the set is one the calling thread may run on now (its
    /// affinity, as the process was started with it): a VMM calls this before it starts
    /// threads that [`apply`](Self::apply) the set, so that a wrong set is an error at
    /// start, not a warning later on another thread.
    pub fn check(&self) -> Result<(), AffinityError> {
        let allowed = CpuSet::allowed()?;
        if self.is_subset(&allowed) {
            Ok(())
        } else {
            Err(AffinityError::NotAllowed {
                wanted: Box::new(*self),
                allowed: Box::new(allowed),
            })
        }
    }

    /// Lets the calling thread run only on the set's CPUs (`sched_setaffinity(0, ...)`).
    pub fn apply(&self) -> Result<(), AffinityError> {
        self.apply_to(0)
    }

    /// Lets thread `tid` (0: the calling thread) run only on the set's CPUs.
    pub fn apply_to(&self, tid: libc::pid_t) -> Result<(), AffinityError> {
        // SAFETY: an all-zero cpu_set_t is an empty set.
        let mut raw: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for cpu in self.cpus() {
            // SAFETY: CPU_SET writes bit `cpu` (below MAX_CPUS) of `raw`.
            unsafe { libc::CPU_SET(cpu, &mut raw) };
        }
        // SAFETY: `raw` is a cpu_set_t of the size passed; the kernel only reads it.
        let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &raw) };
        if rc != 0 {
            return Err(AffinityError::Sched {
                step: "sched_setaffinity",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl FromStr for CpuSet {
    type Err = AffinityError;

    fn from_str(text: &str) -> Result<CpuSet, AffinityError> {
        let syntax = || AffinityError::Syntax(text.to_string());
        let number = |s: &str| -> Result<usize, AffinityError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            match s.parse::<usize>() {
                Ok(n) if n < MAX_CPUS => Ok(n),
                _ => Err(AffinityError::TooLarge(s.to_string())),
            }
        };
        let mut set = CpuSet { bits: [0; WORDS] };
        for part in text.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let n = number(part)?;
                    (n, n)
                }
            };
            if lo > hi {
                return Err(syntax());
            }
            for cpu in lo..=hi {
                set.insert(cpu);
            }
        }
        Ok(set)
    }
}

impl fmt::Display for CpuSet {
    /// The list form `from_str` takes, ranges joined: `0,2-3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut cpu = 0;
        while cpu < MAX_CPUS {
            if !self.contains(cpu) {
                cpu += 1;
                continue;
            }
            let start = cpu;
            while cpu + 1 < MAX_CPUS && self.contains(cpu + 1) {
                cpu += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == cpu {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{cpu}")?;
            }
            cpu += 1;
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_as_taskset_writes_them() {
        for (text, cpus, shown) in [
            ("1", vec![1], "1"),
            ("0-3", vec![0, 1, 2, 3], "0-3"),
            ("3,0-1,1", vec![0, 1, 3], "0-1,3"),
            ("1023", vec![1023], "1023"),
        ] {
            let s: CpuSet = text.parse().unwrap();
            assert_eq!(s.cpus().collect::<Vec<_>>(), cpus, "{text}");
            assert_eq!(s.to_string(), shown, "{text}");
        }
        for bad in ["", ",", "1,", "a", "-1", "1-", "3-1", "1 ", "0x1", "1-2-3"] {
            assert!(
                matches!(bad.parse::<CpuSet>(), Err(AffinityError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "1024".parse::<CpuSet>(),
            Err(AffinityError::TooLarge(n)) if n == "1024"
        ));
        assert!(matches!(
            "99999999999999999999999".parse::<CpuSet>(),
            Err(AffinityError::TooLarge(_))
        ));
    }

    #[test]
    fn a_thread_takes_the_set_the_kernel_then_reports() {
        let allowed = CpuSet::allowed().unwrap();
        let first = allowed.cpus().next().expect("some CPU");
        let one = CpuSet::single(first).unwrap();
        one.check().unwrap();
        let got = std::thread::spawn(move || {
            one.apply().unwrap();
            CpuSet::allowed().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(got, one);
        // This thread kept its own set.
        assert_eq!(CpuSet::allowed().unwrap(), allowed);
        let absent = CpuSet::single(MAX_CPUS - 1).unwrap();
        let e = absent.check().unwrap_err();
        assert!(matches!(e, AffinityError::NotAllowed { .. }), "{e}");
        assert!(e.to_string().contains("1023"), "{e}");
    }
}
