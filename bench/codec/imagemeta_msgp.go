// Package codec holds a copy of imgcache.ImageMeta for tinylib/msgp code generation, so that
// BenchmarkCodec can set msgp's generated encoder beside ImageMeta's hand-written one. It lives in
// the bench module so that the msgp runtime is a dependency of the benchmarks only.
//
// Regenerate with `go generate ./codec` from bench/.
package codec

//go:generate go run github.com/tinylib/msgp@v1.6.5 -file imagemeta_msgp.go -tests=false

import "time"

// ModTime decodes in UTC, as ImageMeta.UnmarshalBinary does; msgp's default is the local zone.
//msgp:timezone utc

// ImageMetaTuple is encoded as a MessagePack array instead of a map: no field names, so smaller and
// faster, but fields are matched by position, as in ImageMeta's hand-written form.
//msgp:tuple ImageMetaTuple

// ImageMeta has imgcache.ImageMeta's fields in its order with the same types, so that each converts
// to the other (imgcache.ImageMeta(m), codec.ImageMeta(m)); the conversion is also what breaks the
// build if the two ever drift apart. The msg tags are the JSON names.
type ImageMeta struct {
	Path     string    `msg:"path"`
	Size     int64     `msg:"size"`
	MIMEType string    `msg:"mime_type"`
	Width    int       `msg:"width"`
	Height   int       `msg:"height"`
	ETag     string    `msg:"etag"`
	ModTime  time.Time `msg:"mod_time"`
	Source   string    `msg:"source,omitempty"`
}

// ImageMetaTuple is ImageMeta encoded as an array; see the tuple directive above.
type ImageMetaTuple ImageMeta
