package imgcache

import (
	"strings"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
)

// invalidations lets an L1 fill, a fail-safe or a caller about to join a flight tell whether an
// invalidation that could affect its key ran since a point in time. Tags, patterns and flushes
// can touch any key: they bump the global counter. Keys and entities bump one of 256 stripes,
// chosen by the entity id, so a write to one artist does not make every other key's fills and
// fail-safes give up. A key's sequence is the sum of the global counter and its stripe: it moves
// whenever either does.
type invalidations struct {
	global  atomic.Uint64
	stripes [invStripes]atomic.Uint64
}

const invStripes = 256

func stripeOf(entityAndID string) int { return int(xxhash.Sum64String(entityAndID) % invStripes) }

// of returns k's current sequence.
func (v *invalidations) of(k Key) uint64 {
	head, _ := k.split()
	return v.ofName(head)
}

// ofName returns the current sequence of a trusted generation's name (gens.go): for an entity's
// head ("<entity>\x00<id>") of(k) of its keys; for a tag, which holds no NUL, the global counter
// alone, which tag invalidations bump.
func (v *invalidations) ofName(name string) uint64 {
	if strings.IndexByte(name, 0) < 0 {
		return v.global.Load()
	}
	return v.global.Load() + v.stripes[stripeOf(name)].Load()
}

func (v *invalidations) key(k Key) {
	head, _ := k.split()
	v.stripes[stripeOf(head)].Add(1)
}

func (v *invalidations) entity(entity, id string) { v.stripes[stripeOf(entity+"\x00"+id)].Add(1) }

func (v *invalidations) all() { v.global.Add(1) }
