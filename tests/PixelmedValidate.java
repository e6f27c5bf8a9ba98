import com.pixelmed.validate.DicomSRValidator;

/** PixelMed's DicomSRValidator on every file named, in one JVM (its templates compile once). */
public class PixelmedValidate {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String file : args) {
            System.out.println("=== " + file);
            System.out.print(validator.validate(file));
        }
    }
}
