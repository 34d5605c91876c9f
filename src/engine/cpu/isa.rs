//! Which SIMD instructions the CPU engine's kernels use, chosen at run time: one binary runs on every
//! x86-64 (no `-C target-cpu`), and `SQLORA_CPU_ISA` forces a lower path so that every path can be
//! tested on one machine.

use anyhow::{bail, Result};
use std::fmt;

/// A kernel path, from the most portable up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust loops (any target; what the compiler makes of them with its baseline features).
    Portable,
    /// x86-64 AVX2 with FMA: 8 f32 lanes, 16 registers.
    Avx2,
    /// x86-64 AVX-512 (F, BW, DQ and VL, as every AVX-512 CPU since Skylake-SP has): 16 f32 lanes,
    /// 32 registers.
    Avx512,
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        })
    }
}

impl Isa {
    /// Every path this CPU can run, most portable first.
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// Whether this CPU has the instructions of the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// The best path this CPU runs.
    pub fn best() -> Isa {
        *Isa::available().last().expect("the portable path is always available")
    }

    /// The path named by `SQLORA_CPU_ISA` (`avx512`, `avx2` or `portable`), or the best one when it
    /// is not set. Naming a path this CPU lacks is an error that lists those it has.
    pub fn from_env() -> Result<Isa> {
        match std::env::var("SQLORA_CPU_ISA") {
            Ok(name) => Isa::parse(&name),
            Err(_) => Ok(Isa::best()),
        }
    }

    /// The path called `name`, if this CPU runs it.
    pub fn parse(name: &str) -> Result<Isa> {
        let isa = match name {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            other => bail!("SQLORA_CPU_ISA={other}: one of portable, avx2, avx512"),
        };
        if !isa.supported() {
            let have: Vec<String> = Isa::available().iter().map(Isa::to_string).collect();
            bail!("SQLORA_CPU_ISA={name}: this CPU lacks it (it runs {})", have.join(", "));
        }
        Ok(isa)
    }
}

/// `multiversion! { fn name<G: Bound>(arg: Type, ...) => body_fn }` defines `name(isa, args...)`,
/// which runs `body_fn(args...)` (an `#[inline(always)]` function) compiled for `isa`: one copy per
/// x86 path with its `target_feature`s, so the body's loops vectorise with that path's registers,
/// and the body itself off x86 or on the portable path. (A closure passed to a `target_feature`
/// function is not reliably inlined into it; a named `#[inline(always)]` function is.)
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident$(<$($g:ident: $bound:path),*>)?($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name$(<$($g: $bound),*>)?(isa: $crate::engine::cpu::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512$(<$($g: $bound),*>)?($($arg: $ty),*) $(-> $ret)? {
                $body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2$(<$($g: $bound),*>)?($($arg: $ty),*) $(-> $ret)? {
                $body($($arg),*)
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: an `Isa` other than the portable one is used only where the CPU has its
                // instructions (`Isa::supported`, checked where the engine's path is chosen).
                $crate::engine::cpu::isa::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                $crate::engine::cpu::isa::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => $body($($arg),*),
            }
        }
    };
}
