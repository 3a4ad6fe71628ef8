// Microphone capture on the audio thread: Float32 render quanta (128 frames) in,
// PCM s16le chunks of `chunkMs` out, posted to the page as transferable ArrayBuffers.
// Collecting on the audio thread keeps the main thread's work to one post per chunk.

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = options?.processorOptions?.chunkMs ?? 20;
    // `sampleRate` is the AudioContext's rate, a global of the worklet scope.
    this.size = Math.round((sampleRate * chunkMs) / 1000);
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const input = inputs[0];
    // No input yet (the microphone is still starting): nothing to convert.
    if (!input || input.length === 0) return true;
    const left = input[0];
    const right = input.length > 1 ? input[1] : null;
    for (let i = 0; i < left.length; i++) {
      // Down-mix to mono; the session declares one channel.
      let s = right ? (left[i] + right[i]) / 2 : left[i];
      s = s < -1 ? -1 : s > 1 ? 1 : s;
      this.sumSquares += s * s;
      this.chunk[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === this.size) this.flush();
    }
    return true; // keep processing for as long as the node is connected
  }

  flush() {
    const rms = Math.sqrt(this.sumSquares / this.size);
    const buffer = this.chunk.buffer;
    this.port.postMessage({ pcm: buffer, rms }, [buffer]);
    // Transferring detached the old array (its length is now 0): start a fresh one.
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
    this.sumSquares = 0;
  }
}

registerProcessor("pcm-capture", PcmCaptureProcessor);
