//! Helpers shared by the fuzz targets: how one input is cut into the several values a
//! target needs. Kept trivial so a crash reproduces from the input alone.

/// Splits `data` at the first `sep` byte: `(before, after)`; `after` is empty without one.
pub fn split(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Frames of `data`: each a little-endian `u16` length then that many bytes (a truncated
/// last frame is what is left). The targets that take a sequence of messages use this.
pub fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.len() < 2 {
            return None;
        }
        let len = u16::from_le_bytes([data[0], data[1]]) as usize;
        let rest = &data[2..];
        let (frame, tail) = rest.split_at(len.min(rest.len()));
        data = tail;
        Some(frame)
    })
}

/// Builds an input of [`frames`] (for seed corpora and regression inputs).
pub fn to_frames<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}
