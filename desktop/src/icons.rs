//! The tray's icons, drawn here rather than kept as image files: one per lifecycle state, each
//! a different colour and shape so that the state reads at a glance and without colour. The
//! build script draws the app's window icon (`icons/icon.png`) with the same code.

/// What an icon shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Look {
    /// A grey ring: nothing runs.
    Stopped,
    /// An amber ring, its upper half filled: on the way up.
    Starting,
    /// A green disc: running.
    Running,
    /// An amber ring, its lower half filled: on the way down.
    Stopping,
    /// A red disc with a white cross: crashed.
    Crashed,
}

impl Look {
    pub const ALL: [Look; 5] = [
        Look::Stopped,
        Look::Starting,
        Look::Running,
        Look::Stopping,
        Look::Crashed,
    ];

    fn colour(self) -> [u8; 3] {
        match self {
            Look::Stopped => [0x8a, 0x8f, 0x98],
            Look::Starting | Look::Stopping => [0xe8, 0xa3, 0x17],
            Look::Running => [0x2e, 0xa0, 0x43],
            Look::Crashed => [0xd7, 0x3a, 0x49],
        }
    }
}

/// `look` as `size`×`size` RGBA pixels, row by row, antialiased at the edges.
pub fn rgba(look: Look, size: u32) -> Vec<u8> {
    let n = size as f32;
    let centre = n / 2.0;
    let outer = n * 0.44;
    let ring = (n * 0.11).max(1.5);
    let [r, g, b] = look.colour();
    let mut pixels = Vec::with_capacity((size * size * 4) as usize);
    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 + 0.5 - centre, y as f32 + 0.5 - centre);
            let d = (px * px + py * py).sqrt();
            // Coverage of the disc (1 inside, 0 outside, a pixel-wide ramp between).
            let disc = (outer - d + 0.5).clamp(0.0, 1.0);
            let inside_ring = (d - (outer - ring) + 0.5).clamp(0.0, 1.0);
            let filled = match look {
                Look::Running | Look::Crashed => true,
                Look::Starting => py < 0.0,
                Look::Stopping => py > 0.0,
                Look::Stopped => false,
            };
            let mut alpha = if filled { disc } else { disc * inside_ring };
            let mut colour = [r, g, b];
            if look == Look::Crashed {
                // A white cross: near either diagonal, well inside the disc.
                let arm = (px - py).abs().min((px + py).abs()) / std::f32::consts::SQRT_2;
                if d < outer * 0.55 && arm < n * 0.07 {
                    colour = [0xff, 0xff, 0xff];
                    alpha = 1.0;
                }
            }
            pixels.extend_from_slice(&colour);
            pixels.push((alpha * 255.0).round() as u8);
        }
    }
    pixels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixel(pixels: &[u8], size: u32, x: u32, y: u32) -> [u8; 4] {
        let i = ((y * size + x) * 4) as usize;
        [pixels[i], pixels[i + 1], pixels[i + 2], pixels[i + 3]]
    }

    #[test]
    fn every_state_has_its_own_icon_with_clear_corners() {
        let drawn: Vec<Vec<u8>> = Look::ALL.iter().map(|&l| rgba(l, 32)).collect();
        for (i, a) in drawn.iter().enumerate() {
            assert_eq!(a.len(), 32 * 32 * 4);
            assert_eq!(
                pixel(a, 32, 0, 0)[3],
                0,
                "{:?}: a transparent corner",
                Look::ALL[i]
            );
            for b in &drawn[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn the_shapes_say_the_state_without_colour() {
        let size = 32;
        let centre = |l| pixel(&rgba(l, size), size, 16, 16)[3];
        let upper = |l| pixel(&rgba(l, size), size, 16, 9)[3];
        let lower = |l| pixel(&rgba(l, size), size, 16, 23)[3];
        assert_eq!(centre(Look::Stopped), 0, "stopped: a ring, empty inside");
        assert_eq!(centre(Look::Running), 255, "running: a full disc");
        assert!(upper(Look::Starting) > 200 && lower(Look::Starting) == 0);
        assert!(lower(Look::Stopping) > 200 && upper(Look::Stopping) == 0);
        assert_eq!(
            &pixel(&rgba(Look::Crashed, size), size, 16, 16)[..3],
            &[0xff; 3]
        );
    }
}
