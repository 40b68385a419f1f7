"""Builds assets/fonts/DejaVuSans-leash.ttf: DejaVu Sans (Debian's fonts-dejavu-core) cut down to the
characters leash's plots draw (Latin-1, Greek, arithmetic and arrow signs), so the binary can embed
a font instead of linking fontconfig/freetype. Dev-only; needs `pip install fonttools`.

Licence: Bitstream Vera licence (DejaVu changes public domain), copied to assets/fonts/LICENSE.
Subsetting is a modification the licence allows; the font name contains neither "Bitstream" nor
"Vera", as it requires."""

from fontTools import subset

SRC = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
OUT = "assets/fonts/DejaVuSans-leash.ttf"

ranges = [
    (0x20, 0x7E),  # ASCII
    (0xA0, 0xFF),  # Latin-1 (±, ×, ·, µ, é ...)
    (0x391, 0x3C9),  # Greek (β, π, Δ, σ, ε ...)
    (0x2010, 0x2027),  # dashes, quotes, bullet, ellipsis
    (0x2190, 0x2193),  # arrows
    (0x2202, 0x221E),  # ∂ ∇ ∑ − √ ∞
    (0x2016, 0x2016),  # ‖ (KL(π‖π_ref))
    (0x2248, 0x2248),  # ≈
    (0x2260, 0x2265),  # ≠ ≤ ≥
]
unicodes = sorted({c for a, b in ranges for c in range(a, b + 1)})

options = subset.Options()
options.layout_features = ["kern"]
options.hinting = False
options.name_IDs = ["*"]
options.notdef_outline = True
font = subset.load_font(SRC, options)
sub = subset.Subsetter(options)
sub.populate(unicodes=unicodes)
sub.subset(font)
font.save(OUT)
print(OUT, len(unicodes), "code points")
