// MD5 (RFC 1321) of a byte array, written for Sluice's dashboard (no vendored
// library): the upload sends each part's MD5 so the gateway can check it.
// Runs in md5worker.js, off the page's main thread.

const SHIFTS = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
const K = new Int32Array(64);
for (let i = 0; i < 64; i++) K[i] = Math.floor(Math.abs(Math.sin(i + 1)) * 2 ** 32) | 0;

function block(state, view, off, M) {
  for (let j = 0; j < 16; j++) M[j] = view.getInt32(off + j * 4, true);
  let [a, b, c, d] = state;
  for (let i = 0; i < 64; i++) {
    let f;
    let g;
    if (i < 16) { f = (b & c) | (~b & d); g = i; }
    else if (i < 32) { f = (d & b) | (~d & c); g = (5 * i + 1) & 15; }
    else if (i < 48) { f = b ^ c ^ d; g = (3 * i + 5) & 15; }
    else { f = c ^ (b | ~d); g = (7 * i) & 15; }
    f = (f + a + K[i] + M[g]) | 0;
    a = d; d = c; c = b;
    const s = SHIFTS[((i >> 4) << 2) | (i & 3)];
    b = (b + ((f << s) | (f >>> (32 - s)))) | 0;
  }
  state[0] = (state[0] + a) | 0;
  state[1] = (state[1] + b) | 0;
  state[2] = (state[2] + c) | 0;
  state[3] = (state[3] + d) | 0;
}

/** The MD5 of ``bytes`` (a Uint8Array) as 32 lowercase hex digits. */
export function md5hex(bytes) {
  const state = new Int32Array([0x67452301, 0xefcdab89 | 0, 0x98badcfe | 0, 0x10325476]);
  const M = new Int32Array(16);
  const whole = bytes.length - (bytes.length % 64);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let off = 0; off < whole; off += 64) block(state, view, off, M);
  const tailLen = bytes.length - whole;
  const tail = new Uint8Array(tailLen < 56 ? 64 : 128);
  tail.set(bytes.subarray(whole));
  tail[tailLen] = 0x80;
  const tailView = new DataView(tail.buffer);
  const bits = bytes.length * 8;
  tailView.setUint32(tail.length - 8, bits >>> 0, true);
  tailView.setUint32(tail.length - 4, Math.floor(bits / 2 ** 32), true);
  for (let off = 0; off < tail.length; off += 64) block(state, tailView, off, M);
  const out = new DataView(new ArrayBuffer(16));
  state.forEach((word, i) => out.setInt32(i * 4, word, true));
  return [...new Uint8Array(out.buffer)].map((x) => x.toString(16).padStart(2, "0")).join("");
}
