// A drawing pad: dark ink on white, by mouse, touch or pen (pointer events), sent as a PNG.

const INK = "#111";
const PAPER = "#fff";

export class Pad {
  constructor(canvas) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.drawn = false;
    this.last = null;
    this.clear();
    canvas.addEventListener("pointerdown", (event) => this.down(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      canvas.addEventListener(name, () => { this.last = null; });
    }
  }

  clear() {
    const { context, canvas } = this;
    context.fillStyle = PAPER;
    context.fillRect(0, 0, canvas.width, canvas.height);
    this.drawn = false;
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * (this.canvas.width / box.width),
            (event.clientY - box.top) * (this.canvas.height / box.height)];
  }

  down(event) {
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last, event.pressure);
  }

  move(event) {
    if (this.last === null) return;
    event.preventDefault();
    const next = this.point(event);
    this.stroke(this.last, next, event.pressure);
    this.last = next;
  }

  // A pen's pressure widens the line a little; a mouse reports 0.5 while a button is down.
  stroke([x0, y0], [x1, y1], pressure) {
    const { context, canvas } = this;
    context.strokeStyle = INK;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.lineWidth = canvas.width * (0.05 + 0.04 * (pressure || 0.5));
    context.beginPath();
    context.moveTo(x0, y0);
    context.lineTo(x1, y1);
    context.stroke();
    this.drawn = true;
  }

  toBlob() {
    return new Promise((resolve) => this.canvas.toBlob(resolve, "image/png"));
  }
}
