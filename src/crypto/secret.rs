//! Secret key newtypes: private bytes, zeroized on drop, redacted `Debug`, no `Clone`.

use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

macro_rules! secret_key {
    ($name:ident, $len:expr, $doc:expr) => {
        #[doc = $doc]
        #[derive(Zeroize, ZeroizeOnDrop)]
        pub struct $name(Box<[u8; $len]>);

        impl $name {
            /// Length of the key in bytes.
            pub const LEN: usize = $len;

            /// Take ownership of key bytes (the caller's copy should be zeroized).
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                let mut b = bytes;
                let k = Self(Box::new(b));
                b.zeroize();
                k
            }

            /// Build a key from a slice; `None` if the length is wrong.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                if bytes.len() != $len {
                    return None;
                }
                let mut k = Box::new([0u8; $len]);
                k.copy_from_slice(bytes);
                Some(Self(k))
            }

            /// A fresh random key from the OS CSPRNG.
            pub fn generate() -> Self {
                let mut k = Box::new([0u8; $len]);
                super::random_bytes(&mut k[..]);
                Self(k)
            }

            /// Expose the key bytes. Callers must not copy them into non-zeroizing storage.
            pub fn expose(&self) -> &[u8; $len] {
                &self.0
            }

            /// An explicit, deliberate copy (there is no `Clone`).
            pub fn duplicate(&self) -> Self {
                Self(Box::new(*self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_key!(Key32, 32, "A 256-bit secret key (AEK, DEK, KEK material).");
secret_key!(
    Key64,
    64,
    "A 512-bit secret key (AES-256-SIV uses two 256-bit halves)."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = Key32::from_bytes([7u8; 32]);
        assert_eq!(format!("{k:?}"), "Key32(<redacted>)");
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(Key32::from_slice(&[0u8; 31]).is_none());
        assert!(Key32::from_slice(&[0u8; 33]).is_none());
        assert_eq!(Key32::from_slice(&[1u8; 32]).unwrap().expose(), &[1u8; 32]);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(Key32::generate().expose(), Key32::generate().expose());
    }
}
