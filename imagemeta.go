package imgcache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// ImageMeta is the metadata an image endpoint needs to answer a request without touching the
// database or the file system: where the bytes are, what they are, and the validators for
// conditional requests (ETag, Last-Modified).
//
// Cache[ImageMeta] stores it with a compact binary encoding (see [ImageMeta.MarshalBinary]) that
// decodes several times faster than encoding/json; ModTime comes back in UTC, to the nanosecond.
type ImageMeta struct {
	Path     string    `json:"path"`             // file path or object key of the image bytes
	Size     int64     `json:"size"`             // length in bytes
	MIMEType string    `json:"mime_type"`        // for Content-Type, e.g. "image/webp"
	Width    int       `json:"width"`            // pixels
	Height   int       `json:"height"`           // pixels
	ETag     string    `json:"etag"`             // entity tag as sent in the ETag header, quotes included
	ModTime  time.Time `json:"mod_time"`         // last modification, for Last-Modified
	Source   string    `json:"source,omitempty"` // where remote artwork was fetched from, if anywhere
}

// imageMetaVersion is the first byte of the binary form; bump it when the field list changes.
const imageMetaVersion = 1

// maxImageMetaField bounds one string field of the binary form, so that a corrupt length cannot ask
// the decoder for an allocation larger than the input could ever justify.
const maxImageMetaField = 1 << 16

var errImageMetaShort = errors.New("imgcache: ImageMeta: truncated binary form")

// MarshalBinary encodes m as: a version byte, then Path, MIMEType, ETag and Source as a uvarint
// length and the bytes, then Size, Width, Height, ModTime's Unix seconds and nanoseconds as varints.
func (m ImageMeta) MarshalBinary() ([]byte, error) {
	return m.AppendBinary(make([]byte, 0, 32+len(m.Path)+len(m.MIMEType)+len(m.ETag)+len(m.Source)))
}

// AppendBinary appends the form described on [ImageMeta.MarshalBinary] to b.
func (m ImageMeta) AppendBinary(b []byte) ([]byte, error) {
	for _, s := range [...]string{m.Path, m.MIMEType, m.ETag, m.Source} {
		if len(s) > maxImageMetaField {
			return nil, fmt.Errorf("imgcache: ImageMeta: field of %d bytes is longer than %d", len(s), maxImageMetaField)
		}
	}
	b = append(b, imageMetaVersion)
	for _, s := range [...]string{m.Path, m.MIMEType, m.ETag, m.Source} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	b = binary.AppendVarint(b, m.Size)
	b = binary.AppendVarint(b, int64(m.Width))
	b = binary.AppendVarint(b, int64(m.Height))
	b = binary.AppendVarint(b, m.ModTime.Unix())
	return binary.AppendVarint(b, int64(m.ModTime.Nanosecond())), nil
}

// UnmarshalBinary decodes the form written by [ImageMeta.MarshalBinary]. It returns an error, never
// panics, on truncated, corrupt or foreign input, and allocates no more than the input's length.
func (m *ImageMeta) UnmarshalBinary(data []byte) error {
	if len(data) == 0 {
		return errImageMetaShort
	}
	if data[0] != imageMetaVersion {
		return fmt.Errorf("imgcache: ImageMeta: binary form version %d, want %d", data[0], imageMetaVersion)
	}
	// One string holds every string field: one allocation instead of four.
	all := string(data)
	d := data[1:]
	var strs [4]string
	for i := range strs {
		n, w := binary.Uvarint(d)
		if w <= 0 || n > maxImageMetaField || n > uint64(len(d)-w) {
			return errImageMetaShort
		}
		off := len(data) - len(d) + w
		strs[i] = all[off : off+int(n)]
		d = d[w+int(n):]
	}
	var ints [5]int64
	for i := range ints {
		v, w := binary.Varint(d)
		if w <= 0 {
			return errImageMetaShort
		}
		ints[i] = v
		d = d[w:]
	}
	if len(d) != 0 {
		return fmt.Errorf("imgcache: ImageMeta: %d trailing bytes", len(d))
	}
	if ints[4] < 0 || ints[4] >= 1e9 {
		return fmt.Errorf("imgcache: ImageMeta: nanoseconds %d out of range", ints[4])
	}
	*m = ImageMeta{
		Path: strs[0], MIMEType: strs[1], ETag: strs[2], Source: strs[3],
		Size: ints[0], Width: int(ints[1]), Height: int(ints[2]),
		ModTime: time.Unix(ints[3], ints[4]).UTC(),
	}
	return nil
}
