"""TensorFlow's `tf.train.Example` / `SequenceExample` messages, without TensorFlow.

The schema is tensorflow/core/example/{feature,example}.proto. It is built at import time into a
private descriptor pool, so it never clashes with another copy of the same messages (TensorFlow's
or the `tfrecord` package's) loaded in the same process, and parsing runs in protobuf's C backend.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _field(msg, name, number, ftype, label=_F.LABEL_OPTIONAL, type_name=None, packed=False, oneof=None):
    field = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        field.type_name = type_name
    if packed:
        field.options.packed = True
    if oneof is not None:
        field.oneof_index = oneof
    return field


def _map_field(msg, name, entry_name, value_type):
    entry = msg.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name=value_type)
    _field(msg, name, 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, f".tensorflow.{msg.name}.{entry.name}")


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="vtag/tf_example.proto", package="tensorflow", syntax="proto3")
    rep = _F.LABEL_REPEATED
    _field(f.message_type.add(name="BytesList"), "value", 1, _F.TYPE_BYTES, rep)
    _field(f.message_type.add(name="FloatList"), "value", 1, _F.TYPE_FLOAT, rep, packed=True)
    _field(f.message_type.add(name="Int64List"), "value", 1, _F.TYPE_INT64, rep, packed=True)
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, kind in enumerate(("bytes_list", "float_list", "int64_list"), start=1):
        type_name = (
            ".tensorflow." + {"bytes_list": "BytesList", "float_list": "FloatList", "int64_list": "Int64List"}[kind]
        )
        _field(feature, kind, number, _F.TYPE_MESSAGE, type_name=type_name, oneof=0)
    _map_field(f.message_type.add(name="Features"), "feature", "FeatureEntry", ".tensorflow.Feature")
    _field(f.message_type.add(name="FeatureList"), "feature", 1, _F.TYPE_MESSAGE, rep, ".tensorflow.Feature")
    _map_field(f.message_type.add(name="FeatureLists"), "feature_list", "FeatureListEntry", ".tensorflow.FeatureList")
    _field(f.message_type.add(name="Example"), "features", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.Features")
    seq = f.message_type.add(name="SequenceExample")
    _field(seq, "context", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.Features")
    _field(seq, "feature_lists", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.FeatureLists")
    return f


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_build_file())


def _message(name):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"tensorflow.{name}"))


Example = _message("Example")
SequenceExample = _message("SequenceExample")
Features = _message("Features")
