// A live subscription to consented vitals over Server-Sent Events, that survives a dropped
// connection: on error it asks the service for the events it missed ($events since the last
// event number it drew), then reconnects from there, so a reconnect leaves no hole. When the
// subscription itself is gone (idle expiry, a restart of the service) it makes a new one and
// reports the time since which history must come from the lake.

import { api, token } from "/ui/app.js";

export class LiveFeed {
  /**
   * @param {object} o
   * @param {string[]|null} o.patients  null: every patient who consented to me
   * @param {string[]|null} o.metrics   null: every vital sign
   * @param {(readings: object[]) => void} o.onReadings
   * @param {(events: object[]) => void} [o.onDeviceEvents]  gaps, resets, clock jumps
   * @param {(reason: string) => void} o.onClosed   consent ended (the service closed it)
   * @param {(state: string) => void} [o.onState]   "live" | "reconnecting" | "closed"
   * @param {(sinceUs: number) => void} [o.onResubscribed]  a new subscription: backfill from the lake
   */
  constructor(o) {
    Object.assign(this, { onState: () => {}, onResubscribed: () => {}, onDeviceEvents: () => {} }, o);
    this.last = 0;
    this.lastTimeUs = 0;
    this.es = null;
    this.sub = null;
    this.stopped = false;
    this.reconnects = 0;
    this.taken = 0; // events taken since the subscription began (== last: none missed)
  }

  async start() {
    this.sub = await api("/fhir/Subscription", {
      method: "POST", body: { patients: this.patients, metrics: this.metrics },
    });
    this.last = 0;
    this.taken = 0;
    this.connect();
    return this.sub;
  }

  connect() {
    if (this.stopped) return;
    const url = `${this.sub.sse}?since=${this.last}&access_token=${encodeURIComponent(token())}`;
    const es = (this.es = new EventSource(url));
    es.addEventListener("open", () => this.onState("live"));
    es.addEventListener("event-notification", (e) => this.take(JSON.parse(e.data)));
    es.addEventListener("closed", (e) => {
      es.close();
      this.stopped = true;
      this.onState("closed");
      this.onClosed(JSON.parse(e.data).reason);
    });
    es.addEventListener("error", () => {
      if (this.es !== es || this.stopped) return;
      es.close();
      this.recover();
    });
  }

  take(bundle) {
    const readings = [], events = [];
    for (const entry of bundle.entry.slice(1)) {
      const r = entry.resource;
      if (r.n <= this.last) continue; // already drawn (a backfill overlapping the stream)
      this.last = r.n;
      this.taken += 1;
      if (r.event) { events.push(r); continue; } // a device event: gap, reset, clock jump
      this.lastTimeUs = Math.max(this.lastTimeUs, r.t_us);
      readings.push(r);
    }
    if (readings.length) this.onReadings(readings);
    if (events.length) this.onDeviceEvents(events);
  }

  /** The connection dropped: fetch what was missed, then follow again from there. */
  async recover() {
    this.onState("reconnecting");
    this.reconnects += 1;
    await new Promise((r) => setTimeout(r, 500));
    try {
      this.take(await api(`/fhir/Subscription/${this.sub.id}/$events?eventsSinceNumber=${this.last}`));
      this.connect();
    } catch (e) {
      if (e.status === 404 || e.status === 410) {
        // The subscription is gone, or what it missed is gone from Kafka too (410): a new
        // one, and the lake for what came in between.
        const since = this.lastTimeUs;
        try {
          await this.start();
          this.onResubscribed(since);
        } catch (e2) {
          this.stopped = true;
          this.onState("closed");
          this.onClosed(e2.message);
        }
      } else {
        setTimeout(() => this.recover(), 1500);
      }
    }
  }

  /** Close the connection as a network drop would (the tests use it). */
  drop() {
    if (this.es) this.es.close();
    this.recover();
  }

  stop() {
    this.stopped = true;
    if (this.es) this.es.close();
  }
}
