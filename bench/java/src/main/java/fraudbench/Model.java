package fraudbench;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.FloatBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collections;
import java.util.Map;
import java.util.Set;

import ai.onnxruntime.OnnxTensor;
import ai.onnxruntime.OrtEnvironment;
import ai.onnxruntime.OrtException;
import ai.onnxruntime.OrtSession;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;

/**
 * The worker's scoring path for one manifest, in Java: generic Avro decode of a schemaless Transaction, the manifest's
 * features ((x - mean) / scale in double, then float; booleans 0/1), one onnxruntime call for n rows, decisions by
 * the manifest's thresholds (strictly greater), and the Avro-encoded Verdict.
 *
 * <p>Only the `number` transform without `clip` or `missing` is supported (what models/fraud-gbt.json uses); any
 * other manifest is refused at load.
 */
final class Model implements AutoCloseable {
    final String name;
    final String version;
    final double review;
    final double decline;
    final int width;
    private final int outputColumn;
    private final int[] fields;
    private final boolean[] booleans;
    private final double[] mean;
    private final double[] scale;
    private final String input;
    private final String output;
    private final OrtEnvironment env;
    private final OrtSession session;
    private final GenericDatumReader<GenericRecord> reader;
    private final GenericDatumWriter<GenericRecord> writer;
    private final Schema verdictSchema;
    private final GenericData.EnumSymbol[] decisions = new GenericData.EnumSymbol[3];
    private final ByteArrayOutputStream out = new ByteArrayOutputStream(256);
    private BinaryDecoder decoder;
    private BinaryEncoder encoder;

    Model(Path manifestPath, Path schemaDir) throws IOException, OrtException {
        JsonNode m = new ObjectMapper().readTree(manifestPath.toFile());
        Schema tx = new Schema.Parser().parse(Files.readString(schemaDir.resolve("transaction.avsc")));
        verdictSchema = new Schema.Parser().parse(Files.readString(schemaDir.resolve("verdict.avsc")));
        name = m.get("name").asText();
        version = m.get("version").asText();
        review = m.get("thresholds").get("review").asDouble();
        decline = m.get("thresholds").get("decline").asDouble();
        input = m.get("input").asText();
        output = m.get("output").asText();
        outputColumn = m.path("output_column").asInt(0);
        JsonNode features = m.get("features");
        width = features.size();
        fields = new int[width];
        booleans = new boolean[width];
        mean = new double[width];
        scale = new double[width];
        for (int i = 0; i < width; i++) {
            JsonNode f = features.get(i);
            String transform = f.path("transform").asText("number");
            if (!transform.equals("number") || f.has("clip") || f.has("missing") || f.has("table")) {
                throw new IllegalArgumentException("feature " + f + ": only plain `number` features are supported");
            }
            Schema.Field field = tx.getField(f.get("source").asText());
            if (field == null) {
                throw new IllegalArgumentException("no field " + f.get("source") + " in transaction.avsc");
            }
            fields[i] = field.pos();
            booleans[i] = field.schema().getType() == Schema.Type.BOOLEAN;
            mean[i] = f.get("mean").asDouble();
            scale[i] = f.get("scale").asDouble();
        }
        Schema decision = verdictSchema.getField("decision").schema();
        for (int d = 0; d < 3; d++) {
            decisions[d] = new GenericData.EnumSymbol(decision, decision.getEnumSymbols().get(d));
        }
        reader = new GenericDatumReader<>(tx);
        writer = new GenericDatumWriter<>(verdictSchema);
        env = OrtEnvironment.getEnvironment();
        // As the worker: one intra-op thread, no spinning.
        OrtSession.SessionOptions options = new OrtSession.SessionOptions();
        options.setIntraOpNumThreads(1);
        options.setInterOpNumThreads(1);
        options.setExecutionMode(OrtSession.SessionOptions.ExecutionMode.SEQUENTIAL);
        options.addConfigEntry("session.intra_op.allow_spinning", "0");
        options.addConfigEntry("session.inter_op.allow_spinning", "0");
        Path model = manifestPath.toAbsolutePath().getParent().resolve(m.get("model_file").asText());
        session = env.createSession(model.toString(), options);
    }

    /** Decode one schemaless Avro Transaction. */
    GenericRecord decode(byte[] value) {
        decoder = DecoderFactory.get().binaryDecoder(value, decoder);
        try {
            return reader.read(null, decoder);
        } catch (IOException e) {
            throw new UncheckedIOException("undecodable transaction", e);
        }
    }

    /** Write the features of `txn` into row `row` of the row-major matrix `x` (width columns). */
    void features(GenericRecord txn, float[] x, int row) {
        int base = row * width;
        for (int i = 0; i < width; i++) {
            Object v = txn.get(fields[i]);
            double raw = booleans[i] ? (((Boolean) v) ? 1.0 : 0.0) : ((Number) v).doubleValue();
            x[base + i] = (float) ((raw - mean[i]) / scale[i]);
        }
    }

    /** Fraud probabilities of the first n rows of `x`, one onnxruntime call. */
    float[] score(float[] x, int n) {
        try (OnnxTensor t = OnnxTensor.createTensor(env, FloatBuffer.wrap(x, 0, n * width), new long[] {n, width});
             OrtSession.Result r = session.run(Map.of(input, t), Set.of(output))) {
            OnnxTensor o = (OnnxTensor) r.get(0);
            long[] shape = o.getInfo().getShape();
            int cols = shape.length == 2 ? (int) shape[1] : 1;
            FloatBuffer probs = o.getFloatBuffer();
            float[] p = new float[n];
            for (int i = 0; i < n; i++) {
                p[i] = probs.get(i * cols + outputColumn);
            }
            return p;
        } catch (OrtException e) {
            throw new IllegalStateException("onnxruntime failed", e);
        }
    }

    /** The Avro-encoded Verdict for `txn` scored `probability`. */
    byte[] verdict(GenericRecord txn, double probability, long scoredAt) {
        int d = probability > decline ? 2 : probability > review ? 1 : 0;
        GenericData.Record v = new GenericData.Record(verdictSchema);
        v.put(0, txn.get("transaction_id"));
        v.put(1, txn.get("card_id"));
        v.put(2, probability);
        v.put(3, d == 2);
        v.put(4, decisions[d]);
        v.put(5, review);
        v.put(6, decline);
        v.put(7, name);
        v.put(8, version);
        v.put(9, txn.get("event_time"));
        v.put(10, scoredAt);
        v.put(11, Collections.emptyMap());
        out.reset();
        encoder = EncoderFactory.get().binaryEncoder(out, encoder);
        try {
            writer.write(v, encoder);
            encoder.flush();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return out.toByteArray();
    }

    @Override
    public void close() throws OrtException {
        session.close();
    }
}
