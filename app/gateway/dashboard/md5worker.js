// A module worker: hashes part buffers off the main thread.
// {id, buffer} in; {id, hex, buffer} out (the buffer is transferred both ways, never copied).
import { md5hex } from "./md5.js";

self.onmessage = (event) => {
  const { id, buffer } = event.data;
  const hex = md5hex(new Uint8Array(buffer));
  self.postMessage({ id, hex, buffer }, [buffer]);
};
