//! Bytes -> `Hello` as a handshake message carries it (size limit, every byte
//! used) -> the identity checks a router runs on it: `verify_peer` against the
//! key the handshake authenticated (taken from the input too), then the key
//! book. Nothing may panic; a Hello that passes must bind its name to that
//! key with a good signature, and the book must then agree (`check` after
//! `admit`); a Hello that fails must not change the book.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::handshake::{decode_hello, verify_peer};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::{valid_name, Admission, Binding, KeyBook, Signer};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(hello) = decode_hello(rest) else { return };
    // The authenticated key: the binding's own (an honest peer) or another one.
    let remote_static = if mode & 1 == 0 { hello.binding.keys.static_key } else { [mode; 32] };
    // A book that already pins the name to someone else's keys, or is empty.
    let mut book = KeyBook::new();
    if mode & 2 != 0 {
        let other = Identity::from_private([0x33; 32]).unwrap();
        let _ = book.admit(&Binding::new(hello.name, &other, &Signer::from_identity(&other)));
    }
    let before = book.clone();
    match verify_peer(&hello, &remote_static) {
        Ok(()) => {
            assert!(valid_name(hello.name));
            assert_eq!(hello.binding.name, hello.name);
            assert_eq!(hello.binding.keys.static_key, remote_static);
            hello.binding.verify().unwrap();
            match book.admit_preferring_derived(&hello.binding) {
                Ok(_) => assert_eq!(book.check(&hello.binding), Ok(Some(Admission::Known))),
                Err(_) => assert_eq!(book, before),
            }
        }
        Err(_) => {}
    }
});
