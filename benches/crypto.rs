//! Micro-benchmarks of the crypto path: 4 KiB block seal/open, per-file key derivation,
//! name encryption and volume header parsing. Run with `cargo bench --bench crypto`.
//! Prints the median of several rounds; compare AES-GCM against `openssl speed -evp
//! aes-256-gcm` on the same machine (scripts/bench-crypto.sh does both).

use kekfs::crypto::Key32;
use kekfs::crypto::aead::{Cipher, OVERHEAD};
use kekfs::crypto::kdf;
use kekfs::format::file_header::block_aad;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn median_rate(rounds: usize, per_round: u64, mut f: impl FnMut()) -> f64 {
    let mut rates = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            f();
        }
        let el = t.elapsed().max(Duration::from_nanos(1));
        rates.push(per_round as f64 / el.as_secs_f64());
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    rates[rates.len() / 2]
}

fn main() {
    let key = Key32::generate();
    let c = Cipher::new(&key);
    let aad = block_aad(&[1; 16], &[2; 16], 7);
    let plain = vec![0x5au8; 4096];
    let mut sealed = vec![0u8; 4096 + OVERHEAD];
    let n = 20_000;

    let seal = median_rate(7, n, || {
        c.seal_into(black_box(&aad), black_box(&plain), &mut sealed);
    });
    println!(
        "block seal   4 KiB AES-256-GCM: {:>8.0} blocks/s  {:>6.2} GB/s",
        seal,
        seal * 4096.0 / 1e9
    );
    c.seal_into(&aad, &plain, &mut sealed);
    let mut out = vec![0u8; 4096];
    let open = median_rate(7, n, || {
        c.open_into(black_box(&aad), black_box(&sealed), &mut out)
            .expect("authentic block");
    });
    println!(
        "block open   4 KiB AES-256-GCM: {:>8.0} blocks/s  {:>6.2} GB/s",
        open,
        open * 4096.0 / 1e9
    );

    let vid = [3u8; 16];
    let mut fid = [0u8; 16];
    let hk = median_rate(7, 50_000, || {
        fid[0] = fid[0].wrapping_add(1);
        black_box(kdf::derive32(&key, &vid, kdf::FILE_LABEL, &fid));
    });
    println!("HKDF-SHA256 per-file DEK:       {hk:>8.0} keys/s");

    let names = kekfs::crypto::names::SivCipher::new(kdf::derive64(&key, &vid, kdf::NAME_LABEL));
    let name = b"a-typical-file-name.txt";
    let ne = median_rate(7, 50_000, || {
        black_box(names.encrypt(&[4u8; 16], black_box(name)));
    });
    println!("name encrypt (AES-SIV, 23 B):   {ne:>8.0} names/s");

    let hdr = kekfs::format::file_header::FileHeader::new_random().to_bytes();
    let hp = median_rate(7, 1_000_000, || {
        black_box(kekfs::format::file_header::FileHeader::parse(black_box(&hdr)).ok());
    });
    println!("file header parse:              {hp:>8.0} headers/s");
}
