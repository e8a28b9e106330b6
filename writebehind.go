package imgcache

import (
	"context"
	"sync"
)

// Write-behind (Options.WriteBehind).
//
// A GetOrLoad miss costs two Redis round trips on the caller's path: the one that registers the
// key and takes its lease before the load, and the one that writes the loaded value after it (the
// SET, its verification against the epochs, the lease's release). With write-behind the caller
// gets the value as soon as it is loaded and in L1, and the second round trip is made by the
// cache's writer goroutine, which sends the writes queued meanwhile (up to maxWriteBatch) in one
// pipeline. Nothing else changes: each write is the same SET ... PX, checked as before and taken
// back if an invalidation ran since its load began; the load keeps its lease until its write has
// landed, so another instance that misses the key meanwhile waits for the value instead of loading
// it again. What the caller gives up is knowing, when GetOrLoad returns, that Redis holds the
// value: another instance may miss it for a round trip's time (waiting on the lease), and a write
// that fails is counted (Stats.L2Errors) and logged, but reaches no caller (it never did: a failed
// write never failed a GetOrLoad).
//
// The queue is bounded (maxQueuedWrites): when it is full, a load writes on its caller's path as
// without write-behind, so a Redis that falls behind slows callers down instead of growing memory.
// Close stops taking writes, waits for the writer to send every queued one (each call bounded by
// L2Timeout), and stops it. Batch loads (GetOrLoadMany) write on their caller's path.

const (
	// maxQueuedWrites bounds the writes waiting for the writer.
	maxQueuedWrites = 1024
	// maxWriteBatch bounds the writes sent in one pipeline.
	maxWriteBatch = 64
)

// writeBehind is the queue of a Cache's writer goroutine.
type writeBehind struct {
	max  int           // maxQueuedWrites; a test lowers it
	wake chan struct{} // buffered: a send never blocks, and one pending wake is enough
	done chan struct{} // closed when the writer has exited

	mu      sync.Mutex
	queue   []queuedWrite
	stopped bool // no more writes are taken: Close has begun
}

// queuedWrite is a load's write, with the context values of the flight that loaded it.
type queuedWrite struct {
	ctx context.Context // without cancellation: the flight has ended by the time it is sent
	w   l2write
}

// startWriter starts c's writer goroutine.
func (c *Cache[V]) startWriter() {
	c.wb = &writeBehind{max: maxQueuedWrites, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go c.runWriter(c.wb)
}

// queueWrite hands w to the writer, and reports whether it took it: not when write-behind is off,
// the queue is full, or Close has begun. Its lease, if any, then belongs to the writer.
func (c *Cache[V]) queueWrite(ctx context.Context, w l2write) bool {
	wb := c.wb
	if wb == nil {
		return false
	}
	wb.mu.Lock()
	if wb.stopped || len(wb.queue) >= wb.max {
		wb.mu.Unlock()
		return false
	}
	wb.queue = append(wb.queue, queuedWrite{context.WithoutCancel(ctx), w})
	select { // under mu: stopWriter closes wake under it
	case wb.wake <- struct{}{}:
	default:
	}
	wb.mu.Unlock()
	return true
}

// runWriter sends the queued writes until Close stops it, and the ones still queued then.
func (c *Cache[V]) runWriter(wb *writeBehind) {
	defer close(wb.done)
	for {
		_, open := <-wb.wake
		for {
			wb.mu.Lock()
			n := min(len(wb.queue), maxWriteBatch)
			batch := make([]queuedWrite, n)
			copy(batch, wb.queue)
			wb.queue = append(wb.queue[:0], wb.queue[n:]...)
			wb.mu.Unlock()
			if n == 0 {
				break
			}
			c.sendWrites(batch)
		}
		if !open { // Close: every write it let in has been sent
			return
		}
	}
}

// sendWrites writes batch in one pipeline, under its first write's context values, and then does
// what a load that wrote on its caller's path does: a write that was not kept leaves L1, and a lease
// that the write did not release (it was taken back, or the keys are on a Cluster) is released.
func (c *Cache[V]) sendWrites(batch []queuedWrite) {
	ctx := batch[0].ctx
	ws := make([]l2write, len(batch))
	for i, q := range batch {
		ws[i] = q.w
	}
	for i, kept := range c.writeVerified(ctx, ws) {
		w := ws[i]
		if !kept && c.l1 != nil {
			c.l1.remove(w.k)
		}
		if w.lease != nil && !w.lease.released {
			c.releaseLease(batch[i].ctx, w.k, w.lease.token)
		}
	}
}

// stopWriter takes no more writes, and waits for the writer to send the queued ones and exit.
func (c *Cache[V]) stopWriter() {
	wb := c.wb
	if wb == nil {
		return
	}
	wb.mu.Lock()
	wb.stopped = true
	close(wb.wake)
	wb.mu.Unlock()
	<-wb.done
}
